//! `parma kbs`: the host's part of secret release by a key broker
//! speaking Trustee's KBS protocol (see docs/secrets.md): the relay the
//! agent's exchange goes through, and what an operator registers in
//! Trustee for a node image and a pod's policy.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use crate::output::print;

#[derive(Subcommand)]
pub enum KbsCommand {
    /// Relay the agent's connections to a key broker: listen where the
    /// guest's vsock port 1025 arrives (a vhost-user vsock backend's
    /// `--uds-path` with `_1025`) and copy each stream to the broker. The
    /// stream is TLS that ends in the agent: the relay sees ciphertext.
    #[command(after_help = "Example:\n  parma kbs relay --listen /tmp/vsock.sock_1025 --broker 10.0.0.5:8080")]
    Relay {
        /// The unix socket to listen on.
        #[arg(long)]
        listen: PathBuf,
        /// The broker's address (HOST:PORT).
        #[arg(long)]
        broker: String,
    },
    /// What to register in Trustee for a node image and a pod's policy:
    /// the reference values (from the image's signed reference-values.json,
    /// its signature checked) and a resource policy that gates on them and
    /// on HOST_DATA (Trustee's `init_data` claim).
    #[command(
        after_help = "Example:\n  parma kbs reference-values --values out/node/reference-values.json --policy policy.rego"
    )]
    ReferenceValues {
        /// The node image's reference-values.json.
        #[arg(long)]
        values: PathBuf,
        /// The issuer id (sha256 of the release key's public key, hex) that
        /// must have signed the values: a file's own key proves nothing.
        #[arg(long)]
        issuer: String,
        /// The pod's execution policy (its sha256 is HOST_DATA).
        #[arg(long)]
        policy: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `parma kbs` command.
pub fn execute(command: KbsCommand) -> anyhow::Result<i32> {
    match command {
        KbsCommand::Relay { listen, broker } => {
            let address = std::net::ToSocketAddrs::to_socket_addrs(&broker)
                .with_context(|| format!("--broker {broker:?} is not HOST:PORT"))?
                .next()
                .with_context(|| format!("--broker {broker:?} resolves to nothing"))?;
            let _relay = parma_host::relay::Relay::start(&listen, address)
                .with_context(|| format!("cannot listen on {}", listen.display()))?;
            eprintln!("relaying {} to {address} (Ctrl-C to stop)", listen.display());
            loop {
                std::thread::park();
            }
        }
        KbsCommand::ReferenceValues { values, issuer, policy, json } => {
            let values_path = values.clone();
            let bytes = std::fs::read(&values).with_context(|| format!("cannot read {}", values.display()))?;
            let signed = parma_snp::reference::Signed::parse(&bytes)?;
            let values =
                signed.verify(Some(&issuer)).with_context(|| format!("{} cannot be used", values_path.display()))?;
            let text = std::fs::read(&policy).with_context(|| format!("cannot read {}", policy.display()))?;
            let host_data = parma_policy::policy_hash(&text);
            let out = trustee(&values, &host_data);
            print(json, &out, |out| {
                format!(
                    "# Reference values (Trustee's reference value provider), {} signed by {}:\n{}\n\n\
                     # Resource policy (Trustee's KBS), for pods with HOST_DATA {host_data}:\n{}",
                    values.handler,
                    signed.issuer().unwrap_or_default(),
                    serde_json::to_string_pretty(&out["reference_values"]).unwrap_or_default(),
                    out["resource_policy"].as_str().unwrap_or_default()
                )
            })
        }
    }
}

/// Trustee's names for the image's values and a resource policy.
fn trustee(values: &parma_snp::reference::ReferenceValues, host_data: &str) -> serde_json::Value {
    let measurements: Vec<&str> = values.launches.iter().map(|launch| launch.measurement.as_str()).collect();
    let mut checks = vec![
        "cpu[\"ear.status\"] == \"affirming\"".to_string(),
        format!("snp.init_data == \"{host_data}\""),
        "snp.policy_debug_allowed == false".to_string(),
        "snp.policy_migrate_ma == false".to_string(),
    ];
    if let Ok(min) = values.min_tcb.parse::<parma_snp::TcbVersion>() {
        checks.push(format!("snp.reported_tcb_bootloader >= {}", min.bootloader));
        checks.push(format!("snp.reported_tcb_tee >= {}", min.tee));
        checks.push(format!("snp.reported_tcb_snp >= {}", min.snp));
        checks.push(format!("snp.reported_tcb_microcode >= {}", min.microcode));
    }
    let body: String = checks.iter().map(|check| format!("    {check}\n")).collect();
    let policy = format!(
        "package policy\nimport rego.v1\n\ndefault allow := false\n\n\
         # Node image {handler}: its launch digests are the reference values\n\
         # (snp_launch_measurement), so \"affirming\" covers MEASUREMENT; HOST_DATA\n\
         # (init_data) is the pod's execution policy.\n\
         allow if {{\n    some cpu in input.submods\n    snp := cpu[\"ear.veraison.annotated-evidence\"].snp\n{body}}}\n",
        handler = values.handler
    );
    serde_json::json!({
        "reference_values": {"snp_launch_measurement": measurements},
        "guest_policy": values.guest_policy,
        "min_tcb": values.min_tcb,
        "host_data": host_data,
        "resource_policy": policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trustees_names_for_the_image_and_the_pod() {
        let values: parma_snp::reference::ReferenceValues = serde_json::from_value(serde_json::json!({
            "schema": 1, "handler": "parma-0123abcd", "uvm_manifest_sha256": "", "kernel_config_sha256": "",
            "initrd_sha256": "", "cmdline": "", "guest_policy": "0x30000", "min_tcb": "bl=3,tee=0,snp=8,ucode=115",
            "host_data": "sha256 of the policy",
            "launches": [{"boot": "igvm", "vcpus": 1, "vcpu_type": "EPYC-v4", "measurement": "aa"},
                         {"boot": "ovmf-kernel-hashes", "vcpus": 1, "vcpu_type": "EPYC-v4", "measurement": "bb"}],
        }))
        .unwrap();
        let out = trustee(&values, "cc");
        assert_eq!(out["reference_values"]["snp_launch_measurement"], serde_json::json!(["aa", "bb"]));
        let policy = out["resource_policy"].as_str().unwrap();
        for line in ["snp.init_data == \"cc\"", "snp.reported_tcb_snp >= 8", "snp.reported_tcb_microcode >= 115"] {
            assert!(policy.contains(line), "{policy}");
        }
        // It is Rego regorus parses.
        let mut engine = regorus::Engine::new();
        engine.add_policy("p.rego".into(), policy.into()).unwrap();
    }
}
