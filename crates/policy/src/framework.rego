# The Parma policy framework: the rules a tenant's policy binds its
# enforcement points to. It ships inside the agent, so the launch measurement
# covers it; the tenant's policy (package policy) supplies the data:
# `containers`, `external_processes` and the `allow_*` knobs.
#
# Every enforcement point evaluates to an object:
#   {"allowed": true,  "metadata": [ops...]}          when allowed, with the
#                                                     state changes to apply
#                                                     once the action succeeded
#   {"allowed": false, "reason": {"message": ...,
#                                 "candidates": [...]}} when denied
# The agent passes its state (what is mounted, which containers exist and
# which run) in `input.state`; it never comes from the host.
package framework

import rego.v1

# The policy's data. The engine evaluates each of these rules of the policy
# once, when it loads the policy, and hands the values in as the data
# document `data.parma_policy_data` (so a decision never rebuilds the
# container list from its Rego text): they must not depend on input.
default policy_containers := []

policy_containers := data.parma_policy_data.containers

default external_processes := []

external_processes := data.parma_policy_data.external_processes

default allow_properties_access := false

allow_properties_access := data.parma_policy_data.allow_properties_access

default allow_runtime_logging := false

allow_runtime_logging := data.parma_policy_data.allow_runtime_logging

default allow_unencrypted_scratch := false

allow_unencrypted_scratch := data.parma_policy_data.allow_unencrypted_scratch

# Swap on a host disk (MountScratch) is encrypted and authenticated block by
# block, but has no freshness: the host can put back an older version of a
# block it saw before. Off unless the policy accepts that.
default allow_scratch_swap := false

allow_scratch_swap := data.parma_policy_data.allow_scratch_swap

default allow_capability_dropping := false

# Ordering and completeness: containers named in `start_order` start (at
# `start_container`) only after every container before them started
# (stopping later does not undo that), and attestation waits until every one
# of `required_containers` runs.
default start_order := []

start_order := data.parma_policy_data.start_order

default required_containers := []

required_containers := data.parma_policy_data.required_containers

allow_capability_dropping := data.parma_policy_data.allow_capability_dropping

default fragments := []

fragments := data.parma_policy_data.fragments

# The pod the UVM may become: {"hostname": RE2 pattern, "share_pid": bool};
# absent: no CreateSandbox is allowed.
default policy_sandbox := null

policy_sandbox := data.parma_policy_data.sandbox

state := object.get(input, "state", {})

devices := object.get(state, "devices", {})

overlays := object.get(state, "overlays", {})

# Containers by id: {"name", "status": "created" | "running", ...}; added at
# create, running from start, removed at delete.
containers := object.get(state, "containers", {})

# The names of the policy's containers that ever started: {name: true}.
started_names := object.get(state, "started_names", {})

# What the agent applies when a request names none (runc's defaults), and
# requires when a container of the policy names none.
default_masked_paths := data.parma_policy_data.default_masked_paths

default_readonly_paths := data.parma_policy_data.default_readonly_paths

allowed_with(ops) := {"allowed": true, "metadata": ops}

denied(message, candidates) := {"allowed": false, "reason": {"message": message, "candidates": candidates}}

quote(s) := json.marshal(s)

# ---------------------------------------------------------------- devices

# Every layer root hash of every container, as {hash: true}: built once when
# the policy is loaded (the engine's data document), not on every decision.
policy_layer_hashes := object.get(data.parma_policy_data, "layer_hashes", {})

device_hash_mounted(h) if {
	some target, mounted in devices
	mounted == h
}

mount_device_problems contains sprintf("target %s is already mounted", [quote(input.target)]) if {
	devices[input.target]
}

mount_device_problems contains sprintf("device %s is already mounted at %s", [quote(input.deviceHash), quote(t)]) if {
	some t, h in devices
	h == input.deviceHash
	t != input.target
}

mount_device_problems contains sprintf("device %s is not a layer of any container in the policy", [quote(input.deviceHash)]) if {
	not policy_layer_hashes[input.deviceHash]
}

default mount_device := {"allowed": false, "reason": {"message": "mount_device: input is missing target or deviceHash", "candidates": []}}

mount_device := allowed_with([{"name": "devices", "action": "add", "key": input.target, "value": input.deviceHash}]) if {
	is_string(input.target)
	is_string(input.deviceHash)
	count(mount_device_problems) == 0
}

mount_device := denied(concat("; ", sort(mount_device_problems)), []) if {
	count(mount_device_problems) > 0
}

device_in_use_by(target) := [id |
	some id, overlay in overlays
	some path in overlay.layerPaths
	path == target
]

default unmount_device := {"allowed": false, "reason": {"message": "unmount_device: input is missing unmountTarget", "candidates": []}}

unmount_device := allowed_with([{"name": "devices", "action": "remove", "key": input.unmountTarget}]) if {
	devices[input.unmountTarget]
	count(device_in_use_by(input.unmountTarget)) == 0
}

unmount_device := denied(sprintf("no device is mounted at %s", [quote(input.unmountTarget)]), []) if {
	is_string(input.unmountTarget)
	not devices[input.unmountTarget]
}

unmount_device := denied(sprintf("device at %s is in use by the overlay of container(s) %s", [quote(input.unmountTarget), concat(", ", device_in_use_by(input.unmountTarget))]), []) if {
	devices[input.unmountTarget]
	count(device_in_use_by(input.unmountTarget)) > 0
}

# ---------------------------------------------------------------- overlays

# The root hashes of the layers the host asks to stack, from the devices it mounted.
overlay_hashes := [h |
	some path in input.layerPaths
	h := object.get(devices, path, sprintf("<nothing mounted at %s>", [path]))
]

layer_failures(c) := [sprintf("container %s has %d layers, the overlay has %d", [quote(c.name), count(c.layers), count(overlay_hashes)])] if {
	count(c.layers) != count(overlay_hashes)
} else := [msg |
	some i, h in overlay_hashes
	h != c.layers[i]
	msg := sprintf("layer %d is %s, container %s expects %s", [i, h, quote(c.name), c.layers[i]])
]

# The containers whose layers are exactly these, in policy order: an index
# built at load, keyed by the JSON of the layer list.
overlay_candidates := object.get(data.parma_policy_data.containers_by_layers, json.marshal(overlay_hashes), [])

overlay_target_used if {
	some id, overlay in overlays
	overlay.target == input.target
}

mount_overlay_problems contains sprintf("container %s already has an overlay", [quote(input.containerID)]) if {
	overlays[input.containerID]
}

mount_overlay_problems contains sprintf("target %s already holds an overlay", [quote(input.target)]) if {
	overlay_target_used
}

mount_overlay_problems contains sprintf("no device is mounted at %s", [quote(path)]) if {
	some path in input.layerPaths
	not devices[path]
}

default mount_overlay := {"allowed": false, "reason": {"message": "mount_overlay: input is missing containerID, layerPaths or target", "candidates": []}}

mount_overlay := allowed_with([{"name": "overlays", "action": "add", "key": input.containerID, "value": {
	"target": input.target,
	"layerPaths": input.layerPaths,
	"layers": overlay_hashes,
	"candidates": overlay_candidates,
}}]) if {
	is_string(input.containerID)
	is_string(input.target)
	is_array(input.layerPaths)
	count(mount_overlay_problems) == 0
	count(overlay_candidates) > 0
}

mount_overlay := denied(concat("; ", sort(mount_overlay_problems)), []) if {
	count(mount_overlay_problems) > 0
}

mount_overlay := denied("the layers match no container in the policy", [{"container": c.name, "failures": layer_failures(c)} | some c in policy_containers]) if {
	is_array(input.layerPaths)
	count(mount_overlay_problems) == 0
	count(overlay_candidates) == 0
}

default unmount_overlay := {"allowed": false, "reason": {"message": "unmount_overlay: input is missing unmountTarget", "candidates": []}}

overlay_at(target) := id if {
	some id, overlay in overlays
	overlay.target == target
}

unmount_overlay := allowed_with([{"name": "overlays", "action": "remove", "key": overlay_at(input.unmountTarget)}]) if {
	id := overlay_at(input.unmountTarget)
	not containers[id]
}

unmount_overlay := denied(sprintf("no overlay is mounted at %s", [quote(input.unmountTarget)]), []) if {
	is_string(input.unmountTarget)
	not overlay_at(input.unmountTarget)
}

unmount_overlay := denied(sprintf("container %s still exists on the overlay at %s", [quote(overlay_at(input.unmountTarget)), quote(input.unmountTarget)]), []) if {
	containers[overlay_at(input.unmountTarget)]
}

running(id) if containers[id].status == "running"

# ---------------------------------------------------------------- matching

command_failures(expected, actual, what) := [] if {
	expected == actual
} else := [sprintf("%s %s is not %s", [what, json.marshal(actual), json.marshal(expected)])]

env_rule_matches(rule, var) if {
	rule.strategy == "string"
	rule.pattern == var
}

# rule.anchored is "^(?:PATTERN)$", added to every re2 rule when the policy is
# loaded: a pattern matches the whole variable, never a part of it.
env_rule_matches(rule, var) if {
	rule.strategy == "re2"
	regex.match(rule.anchored, var)
}

# A variable is allowed by an exact-string rule (a lookup in the index built
# at load) or else by one of the re2 rules.
env_allowed(c, var) := true if {
	c.env_strings[var]
} else := true if {
	some pattern in c.env_patterns
	regex.match(pattern, var)
}

# Whose rules: a container by name, or an external process (which has none).
owner(c) := sprintf("container %s", [quote(c.name)]) if {
	c.name
} else := "the external process"

env_failures(c, env) := array.concat(
	[sprintf("env %s matches no rule of %s", [quote(var), owner(c)]) |
		some var in env
		not env_allowed(c, var)
	],
	[sprintf("env rule %s of %s is required but no variable matches it", [quote(rule.pattern), owner(c)]) |
		some rule in object.get(c, "env_rules", [])
		object.get(rule, "required", false)
		not any_env_matches(rule, env)
	],
)

any_env_matches(rule, env) if {
	some var in env
	env_rule_matches(rule, var)
}

working_dir_failures(c, dir) := [] if {
	object.get(c, "working_dir", "/") == dir
} else := [sprintf("working dir %s is not %s", [quote(dir), quote(object.get(c, "working_dir", "/"))])]

user_failures(c, user) := [] if {
	not c.user
} else := [] if {
	user_matches(c.user, user)
} else := [sprintf("user %s is not %s", [json.marshal(user), json.marshal(c.user)])]

user_matches(expected, actual) if {
	object.get(expected, "uid", actual.uid) == actual.uid
	object.get(expected, "gid", object.get(actual, "gid", 0)) == object.get(actual, "gid", 0)
	object.get(expected, "name", object.get(actual, "name", "")) == object.get(actual, "name", "")
}

groups_failures(c, groups) := [] if {
	not c.groups
} else := [] if {
	sort(c.groups) == sort(groups)
} else := [sprintf("groups %s are not %s", [json.marshal(groups), json.marshal(c.groups)])]

capability_sets := ["bounding", "effective", "inheritable", "permitted", "ambient"]

capability_failures(c, caps) := [sprintf("capabilities.%s %s are not %s", [set_name, json.marshal(got), json.marshal(want)]) |
	some set_name in capability_sets
	want := sort(object.get(object.get(c, "capabilities", {}), set_name, []))
	got := sort(object.get(caps, set_name, []))
	not capability_set_ok(want, got)
]

capability_set_ok(want, got) if want == got

capability_set_ok(want, got) if {
	allow_capability_dropping == true
	count([cap | some cap in got; not cap in want]) == 0
}

# rule.anchored_source and rule.options_sorted are built at load.
mount_rule_matches(rule, m) if {
	rule.destination == m.destination
	rule.type == m.type
	regex.match(rule.anchored_source, m.source)
	rule.options_sorted == sort(m.options)
}

mount_failures(c, mounts) := array.concat(
	[sprintf("mount %s matches no mount rule of container %s", [json.marshal(m), quote(c.name)]) |
		some m in mounts
		not any_mount_rule(c, m)
	],
	[sprintf("mount rule for %s of container %s is required but no mount matches it", [quote(rule.destination), quote(c.name)]) |
		some rule in object.get(c, "mounts", [])
		object.get(rule, "required", false)
		not rule_has_mount(rule, mounts)
	],
)

rule_has_mount(rule, mounts) if {
	some m in mounts
	mount_rule_matches(rule, m)
}

any_mount_rule(c, m) if {
	some rule in object.get(c, "mounts", [])
	mount_rule_matches(rule, m)
}

flag_failures(c, req) := array.concat(
	[msg |
		object.get(c, "no_new_privileges", false)
		not object.get(req, "noNewPrivileges", false)
		msg := sprintf("container %s requires no_new_privileges", [quote(c.name)])
	],
	array.concat(
		[msg |
			object.get(req, "privileged", false)
			not object.get(c, "allow_elevated", false)
			msg := sprintf("container %s may not run privileged", [quote(c.name)])
		],
		array.concat(
			[msg |
				want := object.get(c, "seccomp_profile_sha256", "")
				got := object.get(req, "seccompProfileSHA256", "")
				want != got
				msg := sprintf("seccomp profile %s is not %s", [quote(got), quote(want)])
			],
			array.concat(
				array.concat(terminal_failures(c, req), rlimit_failures(c, req)),
				[msg |
					object.get(c, "readonly_rootfs", false) == true
					not object.get(req, "readonlyRootfs", false) == true
					msg := sprintf("container %s requires a read-only root", [quote(c.name)])
				],
			),
		),
	),
)

# A process runs on a terminal only if its entry of the policy says
# `"terminal": true`: on a terminal, whoever writes stdin can send the
# process SIGINT, SIGQUIT and SIGTSTP (^C, ^\, ^Z), and a resize sends SIGWINCH,
# whatever the signal rules say.
terminal_failures(entry, req) := ["the process may not run on a terminal (its policy entry has no \"terminal\": true)"] if {
	object.get(req, "terminal", false) != false
	not object.get(entry, "terminal", false) == true
} else := []

# Each resource limit the request sets must be listed for the container
# with at least its soft and hard values (the agent sets limits before it
# drops privileges, so the policy is what bounds a raised hard limit).
rlimit_failures(c, req) := [msg |
	some limit in object.get(req, "rlimits", [])
	not rlimit_allowed(c, limit)
	msg := sprintf("rlimit %s (soft %v, hard %v) is not allowed for %s", [json.marshal(limit.type), limit.soft, limit.hard, owner(c)])
]

rlimit_allowed(c, limit) if {
	some allowed in object.get(c, "rlimits", [])
	allowed.type == limit.type
	limit.soft <= allowed.soft
	limit.hard <= allowed.hard
}

# The request's masked and read-only paths must include every path the
# policy's container requires (runc's defaults when it names none).
path_failures(c, req) := array.concat(
	[sprintf("masked path %s is required by container %s", [quote(p), quote(c.name)]) |
		some p in object.get(c, "masked_paths", default_masked_paths)
		not p in object.get(req, "maskedPaths", [])
	],
	[sprintf("read-only path %s is required by container %s", [quote(p), quote(c.name)]) |
		some p in object.get(c, "readonly_paths", default_readonly_paths)
		not p in object.get(req, "readonlyPaths", [])
	],
)

container_failures(c) := array.concat(
	command_failures(c.command, input.argList, "command"),
	array.concat(
		env_failures(c, input.envList),
		array.concat(
			working_dir_failures(c, input.workingDir),
			array.concat(
				user_failures(c, object.get(input, "user", {"uid": 0})),
				array.concat(
					groups_failures(c, object.get(input, "groups", [])),
					array.concat(
						capability_failures(c, object.get(input, "capabilities", {})),
						array.concat(
							mount_failures(c, object.get(input, "mounts", [])),
							array.concat(flag_failures(c, input), path_failures(c, input)),
						),
					),
				),
			),
		),
	),
)

order_failures(c) := [sprintf("container %s starts after %s, which has not started", [quote(c.name), quote(before)]) |
	some i, name in start_order
	name == c.name
	some j, before in start_order
	j < i
	not started_names[before]
]

# The policy's containers by name, indexed at load (names are unique: a
# policy or fragment that repeats one is refused).
policy_container(name) := data.parma_policy_data.containers_by_name[name]

# ---------------------------------------------------------------- containers

create_candidates := [policy_container(name) | some name in overlays[input.containerID].candidates]

create_passing := [c | some c in create_candidates; container_ok(c)]

# The allowed path: plain checks that stop at the first mismatch and build
# no messages. `container_ok(c)` holds exactly when `container_failures(c)`
# is empty (the golden tables and an engine test hold both to that); the
# failure lists are built only to explain a denial.
container_ok(c) if {
	c.command == input.argList
	env_ok(c, input.envList)
	object.get(c, "working_dir", "/") == input.workingDir
	count(user_failures(c, object.get(input, "user", {"uid": 0}))) == 0
	count(groups_failures(c, object.get(input, "groups", []))) == 0
	capabilities_ok(c, object.get(input, "capabilities", {}))
	mounts_ok(c, object.get(input, "mounts", []))
	flags_ok(c, input)
	count(path_failures(c, input)) == 0
}

# The fast path reads the indexes built at load (`index_env` and
# `index_mounts_and_capabilities` in lib.rs) and calls a function only for
# what the indexes cannot answer (a variable no exact rule allows, a mount).
# It uses no `every`: regorus's register VM (0.14.1) gets `every` wrong when
# its body looks up a collection by the loop variable (see lib.rs).
env_ok(c, env) if {
	count([v | some v in env; not c.env_strings[v]; not env_pattern_allows(c, v)]) == 0
	c.env_required_other == 0
	count([s | some s in c.env_required_strings; not s in env]) == 0
	count([p | some p in c.env_required_patterns; not env_has_match(p, env)]) == 0
}

env_pattern_allows(c, var) if {
	some pattern in c.env_patterns
	regex.match(pattern, var)
}

env_has_match(pattern, env) if {
	some var in env
	regex.match(pattern, var)
}

capabilities_ok(c, caps) := true if {
	count([s | some s in capability_sets; not c.capabilities_sorted[s] == sort(object.get(caps, s, []))]) == 0
} else := true if {
	allow_capability_dropping == true
	count([s | some s in capability_sets; not c.capabilities_sorted[s]]) == 0
	count([cap | some s in capability_sets; some cap in object.get(caps, s, []); not cap in c.capabilities_sorted[s]]) == 0
}

mounts_ok(c, mounts) if {
	count([m | some m in mounts; not any_mount_rule(c, m)]) == 0
	count([rule | some rule in object.get(c, "mounts", []); object.get(rule, "required", false); not rule_has_mount(rule, mounts)]) == 0
}

flags_ok(c, req) if {
	not flag_broken(c, req)
}

flag_broken(c, req) if {
	object.get(c, "no_new_privileges", false)
	not object.get(req, "noNewPrivileges", false)
}

flag_broken(c, req) if {
	object.get(req, "privileged", false)
	not object.get(c, "allow_elevated", false)
}

flag_broken(c, req) if {
	object.get(c, "seccomp_profile_sha256", "") != object.get(req, "seccompProfileSHA256", "")
}

flag_broken(c, req) if count(terminal_failures(c, req)) > 0

flag_broken(c, req) if count(rlimit_failures(c, req)) > 0

flag_broken(c, req) if {
	object.get(c, "readonly_rootfs", false) == true
	not object.get(req, "readonlyRootfs", false) == true
}

default create_container := {"allowed": false, "reason": {"message": "create_container: input is missing containerID", "candidates": []}}

create_container := denied(sprintf("container %s already exists", [quote(input.containerID)]), []) if {
	containers[input.containerID]
}

create_container := denied(sprintf("container %s has no overlay mounted through the policy", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not containers[input.containerID]
	not overlays[input.containerID]
}

# Whether the host may read the container's output and write its input (its
# exec'd processes' too): the container's `allow_stdio_access` (default
# false: the process's stdio is /dev/null).
stdio_access(c) := object.get(c, "allow_stdio_access", false) == true

create_container := {"allowed": true, "allow_stdio_access": stdio_access(create_passing[0]), "allow_attestation": attestation_allowed(create_passing[0]), "metadata": [{"name": "containers", "action": "add", "key": input.containerID, "value": {
	"name": create_passing[0].name,
	"status": "created",
	"argList": input.argList,
	"envList": input.envList,
	"workingDir": input.workingDir,
}}]} if {
	not containers[input.containerID]
	overlays[input.containerID]
	count(create_passing) > 0
}

create_container := denied(
	sprintf("no container of the policy allows this request (tried %s)", [concat(", ", [quote(c.name) | some c in create_candidates])]),
	[{"container": c.name, "failures": container_failures(c)} | some c in create_candidates],
) if {
	not containers[input.containerID]
	overlays[input.containerID]
	count(create_passing) == 0
}

# A created container's init process starts: in the order `start_order`
# gives. Only from here on does it count as started and running.
default start_container := {"allowed": false, "reason": {"message": "start_container: input is missing containerID", "candidates": []}}

created_container := policy_container(containers[input.containerID].name)

start_container := denied(sprintf("container %s does not exist", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not containers[input.containerID]
}

start_container := denied(sprintf("container %s was already started", [quote(input.containerID)]), []) if {
	containers[input.containerID].status != "created"
}

start_container := allowed_with(array.concat(
	[{"name": "containers", "action": "update", "key": input.containerID, "value": object.union(containers[input.containerID], {"status": "running"})}],
	[{"name": "started_names", "action": "add", "key": created_container.name, "value": true} | not started_names[created_container.name]],
)) if {
	containers[input.containerID].status == "created"
	count(order_failures(created_container)) == 0
}

start_container := denied(concat("; ", order_failures(created_container)), []) if {
	containers[input.containerID].status == "created"
	count(order_failures(created_container)) > 0
}

exec_failures(c, process) := array.concat(
	command_failures(process.command, input.argList, "command"),
	array.concat(
		env_failures(c, input.envList),
		array.concat(
			working_dir_failures(c, input.workingDir),
			array.concat(terminal_failures(process, input), rlimit_failures(c, input)),
		),
	),
)

started_container := policy_container(containers[input.containerID].name)

default exec_in_container := {"allowed": false, "reason": {"message": "exec_in_container: input is missing containerID", "candidates": []}}

exec_in_container := denied(sprintf("container %s is not running", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not running(input.containerID)
}

exec_in_container := {"allowed": true, "allow_stdio_access": stdio_access(started_container), "metadata": []} if {
	running(input.containerID)
	exec_allowed
}

exec_in_container := denied(sprintf("no exec process of container %s allows this request", [quote(started_container.name)]), [{
	"container": started_container.name,
	"failures": exec_process_failures,
}]) if {
	running(input.containerID)
	not exec_allowed
}

exec_allowed if {
	some process in object.get(started_container, "exec_processes", [])
	exec_ok(started_container, process)
}

# Holds exactly when `exec_failures(c, process)` is empty.
exec_ok(c, process) if {
	process.command == input.argList
	env_ok(c, input.envList)
	object.get(c, "working_dir", "/") == input.workingDir
	count(terminal_failures(process, input)) == 0
	count(rlimit_failures(c, input)) == 0
}

exec_process_failures := [msg |
	some process in object.get(started_container, "exec_processes", [])
	some msg in exec_failures(started_container, process)
] if {
	count(object.get(started_container, "exec_processes", [])) > 0
} else := [sprintf("container %s lists no exec processes", [quote(started_container.name)])]

default shutdown_container := {"allowed": false, "reason": {"message": "shutdown_container: input is missing containerID", "candidates": []}}

# Deleting a container (whose processes all exited) removes its record.
shutdown_container := allowed_with([{"name": "containers", "action": "remove", "key": input.containerID}]) if {
	containers[input.containerID]
}

shutdown_container := denied(sprintf("container %s does not exist", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not containers[input.containerID]
}

# Changing a running or created container's cgroup limits: only for a
# container whose policy entry has `"allow_resource_updates": true`.
default update_container := {"allowed": false, "reason": {"message": "update_container: input is missing containerID", "candidates": []}}

update_container := denied(sprintf("container %s does not exist", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not containers[input.containerID]
}

update_container := {"allowed": true, "metadata": []} if {
	containers[input.containerID]
	object.get(created_container, "allow_resource_updates", false) == true
}

update_container := denied(sprintf("container %s may not have its resources changed (allow_resource_updates is not true)", [quote(containers[input.containerID].name)]), []) if {
	containers[input.containerID]
	not object.get(created_container, "allow_resource_updates", false) == true
}

default signal_container_process := {"allowed": false, "reason": {"message": "signal_container_process: input is missing containerID or signal", "candidates": []}}

signal_container_process := denied(sprintf("container %s is not running", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not running(input.containerID)
}

signal_container_process := {"allowed": true, "metadata": []} if {
	running(input.containerID)
	signal_allowed
}

signal_container_process := denied(sprintf("signal %d to %s of container %s is not allowed", [input.signal, signal_target, quote(input.containerID)]), []) if {
	running(input.containerID)
	is_number(input.signal)
	not signal_allowed
}

signal_target := "the init process" if {
	input.isInitProcess
} else := sprintf("process %s", [json.marshal(input.argList)])

signal_allowed if {
	input.isInitProcess
	input.signal in object.get(started_container, "signals", [])
}

signal_allowed if {
	not input.isInitProcess
	some process in object.get(started_container, "exec_processes", [])
	process.command == input.argList
	input.signal in object.get(process, "signals", [])
}

# ---------------------------------------------------------------- attestation

# A required container counts while it runs: its record says it started and
# the agent, which passes the ids of the containers whose init process is
# alive in `input.running`, still sees it.
running_names contains containers[id].name if {
	some id in object.get(input, "running", [])
	running(id)
}

missing_required := [name | some name in required_containers; not running_names[name]]

get_attestation := {"allowed": true, "metadata": []} if {
	count(missing_required) == 0
}

get_attestation := denied(sprintf("the container group is not complete: %s not running", [concat(", ", [quote(n) | some n in missing_required])]), []) if {
	count(missing_required) > 0
}

# ---------------------------------------------------------------- a container's own reports

# Whether a container gets an attestation endpoint (the agent binds it into
# the container at create) and reports through it: its entry's
# `allow_attestation` (default false).
attestation_allowed(c) := object.get(c, "allow_attestation", false) == true

# A container asks for a report binding its own data, while it runs. The
# agent names the container from its records (the endpoint the connection
# came to, the caller's cgroup), never from what the caller says.
default container_attestation := {"allowed": false, "reason": {"message": "container_attestation: input is missing containerID or reportData", "candidates": []}}

container_attestation := denied(sprintf("container %s is not running", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not running(input.containerID)
}

container_attestation := {"allowed": true, "metadata": []} if {
	running(input.containerID)
	is_string(input.reportData)
	attestation_allowed(started_container)
}

container_attestation := denied(sprintf("container %s may not get attestation reports (allow_attestation is not true)", [quote(started_container.name)]), []) if {
	running(input.containerID)
	is_string(input.reportData)
	not attestation_allowed(started_container)
}

# ---------------------------------------------------------------- secrets from a key broker

# `brokers`: the key brokers (Trustee's KBS protocol) secrets may come from,
# [{"name", "url" ("https://HOST[:PORT]"), "certificate_sha256" (of its TLS
# certificate, DER, lowercase hex: the agent pins it)}]. A container's
# entry lists what it may receive before it starts: "secrets": [{"broker":
# NAME, "resource": "REPO/TYPE/TAG", "file": NAME in /dev/parma/secrets}].
default brokers := []

brokers := data.parma_policy_data.brokers

secret_from_listed_broker(s) if {
	some b in brokers
	b.name == s.broker
	b.url == input.brokerUrl
	b.certificate_sha256 == input.brokerCertificateSHA256
}

secret_listed(c) if {
	some s in object.get(c, "secrets", [])
	s.resource == input.resource
	s.file == input.file
	secret_from_listed_broker(s)
}

default release_secret := {"allowed": false, "reason": {"message": "release_secret: input is missing containerID", "candidates": []}}

release_secret := denied(sprintf("container %s does not exist", [quote(input.containerID)]), []) if {
	is_string(input.containerID)
	not containers[input.containerID]
}

release_secret := denied(sprintf("container %s was already started: a secret is released before the start", [quote(input.containerID)]), []) if {
	containers[input.containerID].status != "created"
}

release_secret := {"allowed": true, "metadata": []} if {
	containers[input.containerID].status == "created"
	secret_listed(created_container)
}

release_secret := denied(sprintf("container %s lists no secret %s as file %s from a broker at %s with that certificate", [quote(created_container.name), quote(input.resource), quote(input.file), quote(input.brokerUrl)]), []) if {
	containers[input.containerID].status == "created"
	not secret_listed(created_container)
}

# ---------------------------------------------------------------- the pod

sandboxes := object.get(state, "sandbox", {})

create_sandbox_problems contains "the policy allows no sandbox (it has no sandbox rule)" if {
	policy_sandbox == null
}

create_sandbox_problems contains "the UVM is already a pod" if {
	count(sandboxes) > 0
}

create_sandbox_problems contains sprintf("host name %s does not match the policy's %s", [quote(input.hostname), quote(policy_sandbox.hostname)]) if {
	policy_sandbox != null
	not regex.match(concat("", ["^(?:", object.get(policy_sandbox, "hostname", ""), ")$"]), input.hostname)
}

create_sandbox_problems contains "the policy does not allow a shared PID namespace" if {
	policy_sandbox != null
	input.sharePid == true
	not object.get(policy_sandbox, "share_pid", false) == true
}

default create_sandbox := {"allowed": false, "reason": {"message": "create_sandbox: input is missing hostname or sharePid", "candidates": []}}

create_sandbox := allowed_with([{"name": "sandbox", "action": "add", "key": "pod", "value": {"hostname": input.hostname, "sharePid": input.sharePid}}]) if {
	is_string(input.hostname)
	is_boolean(input.sharePid)
	count(create_sandbox_problems) == 0
}

create_sandbox := denied(concat("; ", sort(create_sandbox_problems)), []) if {
	is_string(input.hostname)
	is_boolean(input.sharePid)
	count(create_sandbox_problems) > 0
}

# ---------------------------------------------------------------- the pod's network

# What the host may configure in the pod's network namespace. Refused
# whatever the policy says (as Kata's genpolicy does by default): the
# loopback interface, a zero or multicast MAC, link flags other than NOARP,
# routes through lo, loopback addresses anywhere. The policy's optional
# `network` rule narrows further: {"allowed_cidrs": [CIDR, ...] (every
# address with its whole prefix, every route destination but the default
# one, every gateway, source and neighbour must be inside one), "mtu":
# {"min": N, "max": N}}. The agent hands addresses in canonical form.
default policy_network := {}

policy_network := data.parma_policy_data.network

address_ip(a) := split(a, "/")[0]

is_ipv6(ip) := contains(ip, ":")

is_loopback(ip) if {
	not is_ipv6(ip)
	net.cidr_contains("127.0.0.0/8", ip)
}

is_loopback(ip) if ip == "::1"

mac_problem(mac) := "the MAC address is zero" if {
	mac == "00:00:00:00:00:00"
} else := "the MAC address is multicast" if {
	substring(mac, 1, 1) in {"1", "3", "5", "7", "9", "b", "d", "f"}
}

outside_allowed(ip) if {
	allowed := object.get(policy_network, "allowed_cidrs", null)
	allowed != null
	not inside_some(allowed, ip)
}

inside_some(cidrs, ip) if {
	some cidr in cidrs
	is_ipv6(cidr) == is_ipv6(ip)
	net.cidr_contains(cidr, ip)
}

# Written as flat rules, one problem each: regorus 0.14.1's register VM
# decided an earlier form (array comprehensions guarded by calls to these
# helper functions) differently from the interpreter. The engine tests run
# every network case on both backends.

# Every IP the request names, with what it is for the message.
interface_ips contains ["address", address_ip(address)] if {
	some address in input.addresses
}

# Every network the request names (an address's prefix is a network the
# interface reaches directly, so all of it must be allowed).
interface_cidrs contains ["address", address] if {
	some address in input.addresses
}

route_cidrs contains ["route destination", route.dest] if {
	some route in input.routes
	not endswith(route.dest, "/0")
}

route_ips contains [sprintf("route to %s: gateway", [route.dest]), route.gateway] if {
	some route in input.routes
	route.gateway != ""
}

route_ips contains [sprintf("route to %s: source", [route.dest]), route.source] if {
	some route in input.routes
	route.source != ""
}

neighbor_ips contains ["neighbour", n.toIPAddress] if {
	some n in input.neighbors
}

loopback_problems(ips) := {sprintf("%s %s is a loopback address", [pair[0], pair[1]]) |
	some pair in ips
	is_loopback(pair[1])
}

cidr_problems(ips) := {sprintf("%s %s is outside the policy's allowed_cidrs", [pair[0], pair[1]]) |
	some pair in ips
	outside_allowed(pair[1])
}

update_interface_problems contains "the loopback interface cannot be configured" if input.name == "lo"

update_interface_problems contains mac_problem(input.hwAddr)

update_interface_problems contains sprintf("link flags %d are not 0 or NOARP (128)", [input.rawFlags]) if {
	not input.rawFlags in {0, 128}
}

update_interface_problems contains msg if {
	some msg in loopback_problems(interface_ips)
}

update_interface_problems contains msg if {
	some msg in cidr_problems(interface_cidrs)
}

mtu_within(bounds) if {
	bounds.min <= input.mtu
	input.mtu <= bounds.max
}

update_interface_problems contains sprintf("MTU %d is outside the policy's %d to %d", [input.mtu, bounds.min, bounds.max]) if {
	bounds := object.get(policy_network, "mtu", null)
	bounds != null
	not mtu_within(bounds)
}

default update_interface := {"allowed": false, "reason": {"message": "update_interface: input is missing name, hwAddr, mtu, addresses or rawFlags", "candidates": []}}

update_interface_input_ok if {
	is_string(input.name)
	is_string(input.hwAddr)
	is_number(input.mtu)
	is_array(input.addresses)
	is_number(input.rawFlags)
}

update_interface := {"allowed": true, "metadata": []} if {
	update_interface_input_ok
	count(update_interface_problems) == 0
}

update_interface := denied(concat("; ", sort(update_interface_problems)), []) if {
	update_interface_input_ok
	count(update_interface_problems) > 0
}

update_routes_problems contains sprintf("route to %s goes through lo", [route.dest]) if {
	some route in input.routes
	route.device == "lo"
}

update_routes_problems contains sprintf("route to %s: destination is loopback", [route.dest]) if {
	some route in input.routes
	is_loopback(address_ip(route.dest))
}

update_routes_problems contains msg if {
	some msg in loopback_problems(route_ips)
}

update_routes_problems contains msg if {
	some msg in cidr_problems(route_ips)
}

update_routes_problems contains msg if {
	some msg in cidr_problems(route_cidrs)
}

default update_routes := {"allowed": false, "reason": {"message": "update_routes: input is missing routes", "candidates": []}}

update_routes := {"allowed": true, "metadata": []} if {
	is_array(input.routes)
	count(update_routes_problems) == 0
}

update_routes := denied(concat("; ", sort(update_routes_problems)), []) if {
	is_array(input.routes)
	count(update_routes_problems) > 0
}

add_arp_neighbors_problems contains sprintf("neighbour %s is on lo", [n.toIPAddress]) if {
	some n in input.neighbors
	n.device == "lo"
}

add_arp_neighbors_problems contains sprintf("neighbour %s: state %d is not permanent (128)", [n.toIPAddress, n.state]) if {
	some n in input.neighbors
	n.state != 128
}

add_arp_neighbors_problems contains sprintf("neighbour %s: flags %d are not 0", [n.toIPAddress, n.flags]) if {
	some n in input.neighbors
	n.flags != 0
}

add_arp_neighbors_problems contains sprintf("neighbour %s: %s", [n.toIPAddress, mac_problem(n.lladdr)]) if {
	some n in input.neighbors
}

add_arp_neighbors_problems contains msg if {
	some msg in loopback_problems(neighbor_ips)
}

add_arp_neighbors_problems contains msg if {
	some msg in cidr_problems(neighbor_ips)
}

default add_arp_neighbors := {"allowed": false, "reason": {"message": "add_arp_neighbors: input is missing neighbors", "candidates": []}}

add_arp_neighbors := {"allowed": true, "metadata": []} if {
	is_array(input.neighbors)
	count(add_arp_neighbors_problems) == 0
}

add_arp_neighbors := denied(concat("; ", sort(add_arp_neighbors_problems)), []) if {
	is_array(input.neighbors)
	count(add_arp_neighbors_problems) > 0
}

# ---------------------------------------------------------------- files the orchestrator hands in

# `copy_files`: RE2 patterns of the guest paths CopyFile may write (anchored);
# none: no copy is allowed.
default copy_files := []

copy_files := data.parma_policy_data.copy_files

copy_file_allowed if {
	some pattern in copy_files
	regex.match(concat("", ["^(?:", pattern, ")$"]), input.path)
}

default copy_file := {"allowed": false, "reason": {"message": "copy_file: input is missing path", "candidates": []}}

copy_file := {"allowed": true, "metadata": []} if {
	is_string(input.path)
	copy_file_allowed
}

copy_file := denied(sprintf("file %s matches none of the policy's copy_files", [quote(input.path)]), []) if {
	is_string(input.path)
	not copy_file_allowed
}

# ---------------------------------------------------------------- the UVM itself

default exec_external := {"allowed": false, "reason": {"message": "exec_external: input is missing argList", "candidates": []}}

external_failures(process) := array.concat(
	command_failures(process.command, input.argList, "command"),
	array.concat(env_failures(process, input.envList), working_dir_failures(process, input.workingDir)),
)

exec_external := {"allowed": true, "metadata": []} if {
	some process in external_processes
	count(external_failures(process)) == 0
}

exec_external := denied("no external process of the policy allows this request", [{"container": "external", "failures": [msg |
	some process in external_processes
	some msg in external_failures(process)
]}]) if {
	is_array(input.argList)
	not external_allowed
}

external_allowed if {
	some process in external_processes
	count(external_failures(process)) == 0
}

default scratch_mount := {"allowed": false, "reason": {"message": "scratch_mount: input is missing target or encrypted", "candidates": []}}

scratch_problems contains "unencrypted scratch is not allowed by the policy" if {
	input.encrypted == false
	not allow_unencrypted_scratch == true
}

scratch_problems contains "swap on a host disk (no freshness: the host can replay older blocks) is not allowed by the policy (allow_scratch_swap is false)" if {
	object.get(input, "swap", false) == true
	not allow_scratch_swap == true
}

scratch_mount := {"allowed": true, "metadata": []} if {
	is_string(input.target)
	is_boolean(input.encrypted)
	count(scratch_problems) == 0
}

scratch_mount := denied(concat("; ", sort(scratch_problems)), []) if {
	is_string(input.target)
	count(scratch_problems) > 0
}

scratch_unmount := {"allowed": true, "metadata": []} if is_string(input.unmountTarget)

knob_point(value, name, what) := {"allowed": true, "metadata": []} if {
	value == true
} else := denied(sprintf("%s is not allowed by the policy (%s is false)", [what, name]), [])

# GuestInfo, once a policy is in force.
get_properties := knob_point(allow_properties_access, "allow_properties_access", "reading properties")

# Decided once, when the policy is set: whether the agent keeps writing its
# log (and the kernel its messages) to the console the host reads.
runtime_logging := knob_point(allow_runtime_logging, "allow_runtime_logging", "runtime logging")

# ---------------------------------------------------------------- fragments

# A fragment's issuer (sha256 of its key), feed and SVN, checked against the
# policy's `fragments` list; its signature was checked before this rule runs.
loaded_fragments := object.get(state, "fragments", {})

fragment_issuer_listed if {
	some f in fragments
	f.issuer == input.issuer
}

fragment_feed_listed if {
	some f in fragments
	f.issuer == input.issuer
	f.feed == input.feed
}

load_fragment_problems contains sprintf("issuer %s is not listed in the policy", [quote(input.issuer)]) if {
	not fragment_issuer_listed
}

load_fragment_problems contains sprintf("feed %s is not listed for issuer %s", [quote(input.feed), quote(input.issuer)]) if {
	fragment_issuer_listed
	not fragment_feed_listed
}

load_fragment_problems contains sprintf("svn %d of feed %s is below the minimum %d", [input.svn, quote(input.feed), f.minimum_svn]) if {
	some f in fragments
	f.issuer == input.issuer
	f.feed == input.feed
	input.svn < f.minimum_svn
}

load_fragment_problems contains sprintf("feed %s is already loaded", [quote(input.feed)]) if {
	loaded_fragments[input.feed]
}

# A container name is one container: a fragment may not reuse a name of the
# policy (or of a fragment loaded before), nor repeat one of its own.
load_fragment_problems contains sprintf("container %s is already in the policy", [quote(name)]) if {
	some name in object.get(input, "containers", [])
	data.parma_policy_data.containers_by_name[name]
}

load_fragment_problems contains sprintf("container %s appears more than once in the fragment", [quote(name)]) if {
	names := object.get(input, "containers", [])
	some i, name in names
	some j, other in names
	i < j
	name == other
}

default load_fragment := {"allowed": false, "reason": {"message": "load_fragment: input is missing issuer, feed or svn", "candidates": []}}

load_fragment := allowed_with([{"name": "fragments", "action": "add", "key": input.feed, "value": {"issuer": input.issuer, "svn": input.svn}}]) if {
	is_string(input.issuer)
	is_string(input.feed)
	is_number(input.svn)
	count(load_fragment_problems) == 0
}

load_fragment := denied(concat("; ", sort(load_fragment_problems)), []) if {
	is_string(input.issuer)
	is_string(input.feed)
	is_number(input.svn)
	count(load_fragment_problems) > 0
}
