package policy

import rego.v1

api_version := "0.1.0"

framework_version := "0.1.0"

containers := [
	{
		"name": "web",
		"layers": [
			"1111111111111111111111111111111111111111111111111111111111111111",
			"2222222222222222222222222222222222222222222222222222222222222222",
		],
		"command": ["/bin/server", "--port", "8080"],
		"env_rules": [
			{"pattern": "PATH=/usr/bin:/bin", "strategy": "string", "required": true},
			{"pattern": "MODE=(prod|staging)", "strategy": "re2", "required": false},
		],
		"working_dir": "/srv",
		"user": {"uid": 1000, "gid": 1000},
		"groups": [1000],
		"capabilities": {"bounding": ["CAP_NET_BIND_SERVICE"], "effective": ["CAP_NET_BIND_SERVICE"], "permitted": ["CAP_NET_BIND_SERVICE"], "inheritable": [], "ambient": []},
		"no_new_privileges": true,
		"seccomp_profile_sha256": "",
		"allow_elevated": false,
		"mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/[a-z0-9]+/hosts", "options": ["rbind", "ro"]}],
		"exec_processes": [{"command": ["/bin/health"], "signals": [15]}],
		"signals": [15, 2],
		"rlimits": [{"type": "RLIMIT_NPROC", "soft": 64, "hard": 128}],
		"allow_stdio_access": true,
	},
	{
		"name": "sidecar",
		"layers": [
			"1111111111111111111111111111111111111111111111111111111111111111",
			"3333333333333333333333333333333333333333333333333333333333333333",
		],
		"command": ["/bin/proxy"],
		"env_rules": [{"pattern": "PATH=/usr/bin:/bin", "strategy": "string", "required": false}],
		"working_dir": "/",
		"exec_processes": [],
		"signals": [],
	},
]

external_processes := [{"command": ["/bin/date"], "env_rules": [], "working_dir": "/"}]

allow_properties_access := true

allow_runtime_logging := false

allow_unencrypted_scratch := false

mount_device := data.framework.mount_device

unmount_device := data.framework.unmount_device

mount_overlay := data.framework.mount_overlay

unmount_overlay := data.framework.unmount_overlay

create_container := data.framework.create_container

start_container := data.framework.start_container

update_container := data.framework.update_container

exec_in_container := data.framework.exec_in_container

exec_external := data.framework.exec_external

shutdown_container := data.framework.shutdown_container

signal_container_process := data.framework.signal_container_process

scratch_mount := data.framework.scratch_mount

scratch_unmount := data.framework.scratch_unmount

get_properties := data.framework.get_properties

runtime_logging := data.framework.runtime_logging

get_attestation := data.framework.get_attestation
