package policy

import rego.v1

# Golden scenario for fragments: which issuers (sha256 of their P-384 key)
# may add containers for which feed, from which SVN.

containers := [{"name": "web", "layers": ["1111111111111111111111111111111111111111111111111111111111111111"], "command": ["/bin/web"]}]

fragments := [
	{"issuer": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "feed": "contoso/sidecar", "minimum_svn": 2},
	{"issuer": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "feed": "contoso/logger", "minimum_svn": 0},
	{"issuer": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "feed": "contoso/logger2", "minimum_svn": 0},
	{"issuer": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "feed": "fabrikam/agent", "minimum_svn": 5},
]

load_fragment := data.framework.load_fragment
