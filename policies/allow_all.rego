# FOR DEBUGGING ONLY. This policy allows every request at every enforcement
# point: a UVM launched with it protects nothing the host asks it to do.
# Its hash in HOST_DATA tells a relying party exactly that.
package policy

import rego.v1

api_version := "0.1.0"

mount_device := {"allowed": true}

unmount_device := {"allowed": true}

mount_overlay := {"allowed": true}

unmount_overlay := {"allowed": true}

create_container := {"allowed": true, "allow_stdio_access": true}

start_container := {"allowed": true}

update_container := {"allowed": true}

exec_in_container := {"allowed": true, "allow_stdio_access": true}

exec_external := {"allowed": true}

shutdown_container := {"allowed": true}

signal_container_process := {"allowed": true}

scratch_mount := {"allowed": true}

scratch_unmount := {"allowed": true}

get_properties := {"allowed": true}

runtime_logging := {"allowed": true}

load_fragment := {"allowed": true}

get_attestation := {"allowed": true}

container_attestation := {"allowed": true}

release_secret := {"allowed": true}

create_sandbox := {"allowed": true}

update_interface := {"allowed": true}

update_routes := {"allowed": true}

add_arp_neighbors := {"allowed": true}

copy_file := {"allowed": true}
