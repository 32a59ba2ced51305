package policy

import rego.v1

api_version := "0.1.0"

framework_version := "0.1.0"

containers := [
 {
  "name": "init",
  "layers": [
   "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
   "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
  ],
  "command": [
   "/bin/migrate"
  ],
  "env_rules": [],
  "working_dir": "/",
  "exec_processes": [],
  "signals": []
 },
 {
  "name": "web",
  "layers": [
   "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
   "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
  ],
  "command": [
   "/bin/server"
  ],
  "env_rules": [],
  "working_dir": "/",
  "exec_processes": [],
  "signals": []
 },
 {
  "name": "debug",
  "layers": [
   "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
   "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
  ],
  "command": [
   "/bin/shell-free-probe"
  ],
  "env_rules": [],
  "working_dir": "/",
  "exec_processes": [],
  "signals": []
 }
]

# init runs (and exits) before web starts; attestation waits while web is not running.
start_order := ["init", "web"]

required_containers := ["web"]

mount_device := data.framework.mount_device

mount_overlay := data.framework.mount_overlay

create_container := data.framework.create_container

start_container := data.framework.start_container

shutdown_container := data.framework.shutdown_container

get_attestation := data.framework.get_attestation
