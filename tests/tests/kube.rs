//! `parma policy gen --pod`: a Kubernetes workload's policy from the test
//! image (no VM): every container, kubelet's command/args rules, env,
//! security context, volumes and probes, the annotation written back, the
//! same bytes every time; and what a confidential pod cannot have refused
//! by name. The CLI runs as a user runs it.

use std::path::Path;

use anyhow::{Context, ensure};
use parma_host::kube::{Images, generate_pod};
use parma_tests::{Paths, oci};
use serde_json::Value;

const POD: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: fast}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels: {app: web}
spec:
  shareProcessNamespace: true
  volumes:
    - name: cache
      emptyDir: {}
    - name: settings
      configMap: {name: settings}
  initContainers:
    - name: prepare
      image: parma-test:1
      command: ["/bin/sh", "-c", "echo ready > /cache/ready"]
      volumeMounts: [{name: cache, mountPath: /cache}]
  containers:
    - name: app
      image: parma-test:1
      args: ["pod", "8080"]
      env:
        - {name: MODE, value: fast}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - {name: GREETING_TOO, value: "$(GREETING) again"}
      securityContext:
        runAsUser: 0
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}
      volumeMounts:
        - {name: cache, mountPath: /cache, readOnly: true}
        - {name: settings, mountPath: /etc/settings}
      livenessProbe:
        exec: {command: [/bin/cat, /cache/ready]}
    - name: sidecar
      image: parma-test:1
      command: [/bin/sleep]
      args: ["3600"]
      tty: true
"#;

fn containers(policy: &str) -> anyhow::Result<Vec<Value>> {
    let start = policy.find("json.unmarshal(`").context("no containers")? + "json.unmarshal(`".len();
    let end = start + policy[start..].find('`').context("no end")?;
    Ok(serde_json::from_str(&policy[start..end])?)
}

fn by_name<'a>(containers: &'a [Value], name: &str) -> anyhow::Result<&'a Value> {
    containers.iter().find(|c| c["name"] == name).with_context(|| format!("no {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn a_pods_policy_covers_every_container_as_kubelet_starts_it() -> anyhow::Result<()> {
    let paths = Paths::get();
    let dir = tempfile::tempdir()?;
    let image = oci::build_test_image(&dir.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let images = Images::parse(&[format!("{}={}#{}", oci::REF_NAME, image.layout.display(), oci::REF_NAME)])?;
    let layers = dir.path().join("layers");
    let (policies, yaml) = generate_pod(POD, &images, &layers)?;
    ensure!(policies.len() == 1 && policies[0].workload == "Pod web-1", "{policies:?}");
    let policy = &policies[0].policy;
    // The same bytes every time, and the annotation is the policy.
    ensure!(generate_pod(POD, &images, &layers)? == (policies.clone(), yaml.clone()), "not deterministic");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml)?;
    ensure!(docs.len() == 2 && docs[0]["kind"] == "ConfigMap", "{yaml}");
    let annotation = docs[1]["metadata"]["annotations"]["io.parma.policy"].as_str().context("no annotation")?;
    ensure!(parma_host::annotation::decode(annotation)? == *policy);
    ensure!(docs[1]["metadata"]["labels"]["app"] == "web", "the rest stays: {yaml}");
    parma_policy::Engine::new(&parma_policy::Policy::from_bytes(policy.clone().into_bytes())?)?;

    let all = containers(policy)?;
    ensure!(all.len() == 3, "{all:?}");
    let prepare = by_name(&all, "prepare")?;
    // command replaces the entrypoint and drops the image's cmd.
    ensure!(strings(&prepare["command"]) == ["/bin/sh", "-c", "echo ready > /cache/ready"], "{prepare}");
    let app = by_name(&all, "app")?;
    // args replace the cmd, after the image's entrypoint.
    ensure!(strings(&app["command"]) == [oci::ENTRYPOINT, "pod", "8080"], "{app}");
    let env = app["env_rules"].to_string();
    for expected in ["MODE=fast", "POD_IP=.*", "GREETING_TOO=.*", "HOSTNAME=web-1", "KUBERNETES_", "GREETING=hello"] {
        ensure!(env.contains(expected), "{expected}: {env}");
    }
    ensure!(app["user"]["uid"] == 0 && app["no_new_privileges"] == true && app["readonly_rootfs"] == true, "{app}");
    ensure!(strings(&app["capabilities"]["bounding"]) == ["CAP_NET_BIND_SERVICE"], "{app}");
    ensure!(app["exec_processes"][0]["command"] == serde_json::json!(["/bin/cat", "/cache/ready"]), "{app}");
    ensure!(app["signals"] == serde_json::json!([15, 9]), "{app}");
    let mounts = app["mounts"].as_array().context("mounts")?;
    let mount = |destination: &str| mounts.iter().find(|m| m["destination"] == destination);
    ensure!(mount("/etc/hosts").is_some() && mount("/etc/resolv.conf").is_some(), "{mounts:?}");
    ensure!(mount("/var/run/secrets/kubernetes.io/serviceaccount").is_some(), "{mounts:?}");
    let cache = mount("/cache").context("/cache")?;
    ensure!(cache["source"] == "/run/parma/volumes/cache" && strings(&cache["options"]).contains(&"ro".into()));
    let settings = mount("/etc/settings").context("/etc/settings")?;
    ensure!(
        settings["source"] == "/run/parma/files/volumes/settings"
            && strings(&settings["options"]).contains(&"ro".into())
    );
    let sidecar = by_name(&all, "sidecar")?;
    ensure!(strings(&sidecar["command"]) == ["/bin/sleep", "3600"] && sidecar["terminal"] == true, "{sidecar}");
    // The image's user (1000) where the pod names none.
    ensure!(sidecar["user"]["uid"] == 1000, "{sidecar}");
    ensure!(policy.contains("\"share_pid\": true") && policy.contains("\"hostname\": \"web-1\""), "{policy}");
    ensure!(policy.contains("/run/parma/files/volumes/settings/"), "copy_files: {policy}");
    Ok(())
}

#[test]
fn what_a_confidential_pod_cannot_have_is_refused_by_name() -> anyhow::Result<()> {
    let paths = Paths::get();
    let dir = tempfile::tempdir()?;
    let image = oci::build_test_image(&dir.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let images = Images::parse(&[format!("img={}", image.layout.display())])?;
    let layers = dir.path().join("layers");
    let pod = |spec: &str| {
        format!("kind: Pod\nmetadata: {{name: p}}\nspec:\n  containers: [{{name: c, image: img}}]\n{spec}")
    };
    for (spec, reason) in [
        ("  hostNetwork: true\n", "hostNetwork"),
        ("  hostPID: true\n", "hostPID"),
        ("  volumes: [{name: v, hostPath: {path: /etc}}]\n", "hostPath volume"),
        ("  volumes: [{name: v, persistentVolumeClaim: {claimName: x}}]\n", "persistentVolumeClaim"),
    ] {
        let err = generate_pod(&pod(spec), &images, &layers).unwrap_err();
        ensure!(format!("{err:#}").contains(reason), "{reason}: {err:#}");
    }
    let privileged = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: img, securityContext: {privileged: true}}]\n";
    ensure!(format!("{:#}", generate_pod(privileged, &images, &layers).unwrap_err()).contains("privileged"));
    let unknown = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: other}]\n";
    ensure!(format!("{:#}", generate_pod(unknown, &images, &layers).unwrap_err()).contains("no --image for \"other\""));
    let none = "kind: Service\nmetadata: {name: s}\n";
    ensure!(format!("{:#}", generate_pod(none, &images, &layers).unwrap_err()).contains("no Pod"));

    // A Deployment's template is annotated (the pods carry it), through the CLI.
    let deployment = dir.path().join("deploy.yaml");
    std::fs::write(
        &deployment,
        "kind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    metadata: {labels: {app: d}}\n    spec:\n      containers: [{name: c, image: img}]\n",
    )?;
    let out = dir.path().join("out.yaml");
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it", parma.display());
    let run = std::process::Command::new(&parma)
        .args(["policy", "gen", "--pod"])
        .arg(&deployment)
        .arg("--image")
        .arg(format!("img={}", image.layout.display()))
        .arg("--layers-dir")
        .arg(&layers)
        .arg("--out")
        .arg(&out)
        .output()?;
    ensure!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    ensure!(String::from_utf8_lossy(&run.stderr).contains("Deployment d: policy sha256 (HOST_DATA): "));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(&out)?)?;
    let annotation = docs[0]["spec"]["template"]["metadata"]["annotations"]["io.parma.policy"].as_str();
    let policy = parma_host::annotation::decode(annotation.context("no annotation on the template")?)?;
    // A template's pods get generated names: any RFC 1123 host name.
    ensure!(policy.contains(parma_host::policy_gen::RFC1123_HOSTNAME.replace('\\', "\\\\").as_str()), "{policy}");
    ensure!(!Path::new(&out).with_extension("rego").exists());
    Ok(())
}

/// A pod's annotations give its containers secrets from its brokers
/// (`io.parma.brokers`, `io.parma.secrets`): the policy lists
/// them as `--spec` would, and the runtime's reading of the policy finds
/// them; an annotation for a container the pod does not have, a broker it
/// does not list, or malformed JSON is refused by name.
#[test]
fn a_pods_annotations_give_its_containers_secrets_from_its_brokers() -> anyhow::Result<()> {
    let paths = Paths::get();
    let dir = tempfile::tempdir()?;
    let image = oci::build_test_image(&dir.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let images = Images::parse(&[format!("img={}", image.layout.display())])?;
    let layers = dir.path().join("layers");
    let pin = "ab".repeat(32);
    let brokers =
        format!(r#"[{{"name": "trustee", "url": "https://kbs.example:8080", "certificate_sha256": "{pin}"}}]"#);
    let brokers = brokers.as_str();
    let secrets = r#"{"app": [{"broker": "trustee", "resource": "default/db/password", "file": "db"}]}"#;
    let ghost = r#"{"ghost": [{"broker": "trustee", "resource": "default/db/password", "file": "db"}]}"#;
    let pod = |annotations: &[(&str, &str)]| {
        let annotations: serde_json::Map<String, Value> =
            annotations.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        let metadata = serde_json::json!({"name": "p", "annotations": annotations});
        format!(
            "kind: Pod\nmetadata: {metadata}\nspec:\n  containers: [{{name: app, image: img}}, {{name: other, image: img}}]\n"
        )
    };
    let (policies, _) =
        generate_pod(&pod(&[("io.parma.brokers", brokers), ("io.parma.secrets", secrets)]), &images, &layers)?;
    let policy = parma_policy::Policy::from_bytes(policies[0].policy.clone().into_bytes())?;
    let listed = parma_policy::listed_secrets(&policy, "app")?;
    ensure!(listed.len() == 1, "{listed:?}");
    ensure!(listed[0].secret.resource == "default/db/password" && listed[0].secret.file == "db", "{listed:?}");
    ensure!(listed[0].broker.url == "https://kbs.example:8080" && listed[0].broker.certificate_sha256 == pin);
    ensure!(parma_policy::listed_secrets(&policy, "other")?.is_empty(), "only app has secrets");
    ensure!(parma_policy::listed_brokers(&policy)? == [listed[0].broker.clone()]);
    parma_policy::Engine::new(&policy)?;

    let bad_url = brokers.replace("https://kbs.example:8080", "https://kbs.example:8080/kbs");
    let bad_pin = brokers.replace(&pin, "AB");
    let bad_resource = secrets.replace("default/db/password", "password");
    let hidden_file = secrets.replace("\"file\": \"db\"", "\"file\": \".db\"");
    for (annotations, reason) in [
        (
            vec![("io.parma.brokers", brokers), ("io.parma.secrets", ghost)],
            "io.parma.secrets names container \"ghost\", which the pod does not have",
        ),
        (
            vec![("io.parma.secrets", secrets)],
            "from broker \"trustee\", which annotation io.parma.brokers does not list",
        ),
        (vec![("io.parma.brokers", "{"), ("io.parma.secrets", secrets)], "io.parma.brokers is not a JSON list"),
        (
            vec![("io.parma.brokers", brokers), ("io.parma.secrets", r#"{"app": [{}]}"#)],
            "io.parma.secrets is not a JSON object of container names",
        ),
        (vec![("io.parma.brokers", bad_url.as_str())], "broker \"trustee\": the broker URL's port is not 1 to 65535"),
        (vec![("io.parma.brokers", bad_pin.as_str())], "certificate_sha256 is not 64 lowercase hex digits"),
        (vec![("io.parma.brokers", brokers), ("io.parma.secrets", bad_resource.as_str())], "is not REPO/TYPE/TAG"),
        (vec![("io.parma.brokers", brokers), ("io.parma.secrets", hidden_file.as_str())], "file name is not 1 to 64"),
    ] {
        let err = generate_pod(&pod(&annotations), &images, &layers).unwrap_err();
        ensure!(format!("{err:#}").contains(reason), "{reason}: {err:#}");
    }
    // A pod whose containers share a PID namespace could read each other's secrets.
    let shared = pod(&[("io.parma.brokers", brokers), ("io.parma.secrets", secrets)])
        .replace("spec:\n", "spec:\n  shareProcessNamespace: true\n");
    let err = generate_pod(&shared, &images, &layers).unwrap_err();
    ensure!(format!("{err:#}").contains("shareProcessNamespace"), "{err:#}");
    Ok(())
}

/// The contract with the runtime, in a UVM: the policy `--pod` wrote admits
/// what kubelet and the CRI ask for this pod (written out here by hand, as
/// the shim will send them: the pod, the files kubelet hands in, the
/// container with kubelet's variables and mounts) and refuses the same
/// container with an argument, a variable or a mount changed.
#[test]
fn the_pods_policy_admits_what_kubelet_asks_in_a_uvm_and_nothing_else() -> anyhow::Result<()> {
    use parma_protocol::{Mount, Namespace, Request};
    let paths = Paths::get();
    let dir = tempfile::tempdir()?;
    let image = oci::build_test_image(&dir.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let images = Images::parse(&[format!("{}={}", oci::REF_NAME, image.layout.display())])?;
    let layers_dir = dir.path().join("layers");
    let yaml = r#"
kind: Pod
metadata: {name: web-1}
spec:
  volumes: [{name: cache, emptyDir: {}}, {name: settings, configMap: {name: settings}}]
  containers:
    - name: app
      image: parma-test:1
      args: ["pod", "8080"]
      env: [{name: MODE, value: fast}]
      volumeMounts:
        - {name: cache, mountPath: /cache}
        - {name: settings, mountPath: /etc/settings}
"#;
    let (policies, _) = generate_pod(yaml, &images, &layers_dir)?;
    let policy_path = dir.path().join("pod.rego");
    std::fs::write(&policy_path, &policies[0].policy)?;
    let built = parma_layer::build(&image.layout, None, &layers_dir, &|_| {})?;

    let mut boot = parma_tests::Boot::emulated_for_policy(&policy_path)?;
    boot.disks = parma_host::run::layer_disks(&built, &layers_dir);
    let mut guest = parma_tests::Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(std::time::Duration::from_secs(90), std::time::Duration::from_secs(60))?;
    client.set_policy(policies[0].policy.clone()).with_context(|| guest.serial())?;
    client.create_sandbox("web-1", false)?;
    // What kubelet hands in (the shim copies its files).
    for (path, data) in [
        ("pod/hosts", "127.0.0.1 localhost\n10.89.0.2 web-1\n"),
        ("pod/hostname", "web-1\n"),
        ("pod/resolv.conf", "nameserver 10.96.0.10\n"),
        ("pod/serviceaccount/token", "a-token"),
        ("pod/serviceaccount/namespace", "default"),
        ("volumes/settings/mode", "fast"),
    ] {
        client.copy_file(path, data.as_bytes(), 0o644)?;
    }
    let layers = parma_host::run::mount_layers(&mut client, &built)?;
    let mut process =
        parma_host::run::process_from_config(&built.config, &[oci::ENTRYPOINT.into(), "pod".into(), "8080".into()])?;
    process.env.extend(
        ["MODE=fast", "HOSTNAME=web-1", "KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443"]
            .map(String::from),
    );
    parma_tests::as_cri_makes_it(&mut process);
    let bind = |destination: &str, source: &str, mode: &str| Mount {
        destination: destination.into(),
        kind: "bind".into(),
        source: source.into(),
        options: vec!["rbind".into(), mode.into()],
    };
    let mounts = vec![
        bind("/etc/hosts", "/run/parma/files/pod/hosts", "ro"),
        bind("/etc/hostname", "/run/parma/files/pod/hostname", "ro"),
        bind("/etc/resolv.conf", "/run/parma/files/pod/resolv.conf", "ro"),
        bind("/var/run/secrets/kubernetes.io/serviceaccount", "/run/parma/files/pod/serviceaccount", "ro"),
        bind("/cache", "/run/parma/volumes/cache", "rw"),
        bind("/etc/settings", "/run/parma/files/volumes/settings", "ro"),
    ];
    let namespaces = ["pid", "ipc", "uts", "mount", "network"]
        .iter()
        .map(|kind| Namespace {
            kind: kind.to_string(),
            path: matches!(*kind, "ipc" | "uts" | "network").then(|| format!("/proc/42/ns/{kind}")),
        })
        .collect::<Vec<_>>();
    let create = |process: &parma_protocol::ProcessSpec, mounts: &[Mount]| Request::CreateContainer {
        container_id: "app".into(),
        process: process.clone(),
        hostname: Some("web-1".into()),
        readonly_rootfs: false,
        resources: None,
        mounts: mounts.to_vec(),
        masked_paths: None,
        readonly_paths: None,
        namespaces: namespaces.clone(),
    };
    client.mount_overlay("app", &layers, true)?;
    // Changed: an argument, a variable the host adds, a mount made writable.
    let mut other_port = process.clone();
    other_port.args[2] = "9090".into();
    let mut preload = process.clone();
    preload.env.push("LD_PRELOAD=/tmp/x.so".into());
    let mut writable = mounts.clone();
    writable[5].options[1] = "rw".into();
    for (request, what) in [
        (create(&other_port, &mounts), "9090"),
        (create(&preload, &mounts), "LD_PRELOAD"),
        (create(&process, &writable), "/etc/settings"),
        (create(&process, &mounts[..5]), "required"),
    ] {
        parma_tests::denied(client.created(&request), what)?;
    }
    client.created(&create(&process, &mounts)).with_context(|| guest.serial())?;
    client.start_container("app")?;
    let mut out = String::new();
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !out.contains("role=") {
        let (data, eof) = client.read_output("app", None, parma_protocol::OutputStream::Stdout)?;
        out.push_str(&String::from_utf8_lossy(&data));
        ensure!(!eof && std::time::Instant::now() < give_up, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ensure!(out.contains("hostname=web-1") && out.contains("role=server"), "{out}");
    // kubelet's stop: SIGTERM (the policy allows it), then SIGKILL.
    client.signal_process("app", None, 15)?;
    client.signal_process("app", None, 9)?;
    client.shutdown()?;
    guest.wait_exit(std::time::Duration::from_secs(60))?;
    Ok(())
}
