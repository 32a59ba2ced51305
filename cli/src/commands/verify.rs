//! `parma verify`: check an SEV-SNP report against AMD's chain and what you expect.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("certificates").required(true).args(["certs", "vcek"])))]
pub struct VerifyArgs {
    /// The report: 1184 bytes, or hex text.
    #[arg(long)]
    report: PathBuf,
    /// A directory with vcek.der (or .pem) and optionally ark.pem, ask.pem or cert_chain.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// The VCEK alone (DER or PEM); ASK and ARK are AMD's, built in.
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// milan, genoa or turin (default: from the report or the VCEK).
    #[arg(long)]
    product: Option<parma_snp::Product>,
    /// The launch digest you expect (96 hex digits; see `parma measure`).
    #[arg(long)]
    expect_measurement: Option<String>,
    /// The HOST_DATA you expect (64 hex digits; for Parma, `parma policy hash`).
    #[arg(long)]
    expect_host_data: Option<String>,
    /// The REPORT_DATA you expect, as DOMAIN:HEX: `host:HEX` for a report the
    /// host asked for with `parma agent attest --report-data HEX` (the agent
    /// binds it as SHA-512 of a host tag and the data), `container:NAME:HEX`
    /// for one the policy's container NAME asked for through its endpoint
    /// with data HEX, `raw:HEX` for
    /// REPORT_DATA as it is (hex, up to 64 bytes; shorter is zero padded).
    #[arg(long, value_name = "DOMAIN:HEX")]
    expect_report_data: Option<String>,
    /// The least TCB you accept, e.g. bl=3,tee=0,snp=8,ucode=115.
    #[arg(long)]
    min_tcb: Option<parma_snp::TcbVersion>,
    /// The node image's signed reference values (reference-values.json):
    /// the report must match one of its launches (measurement, guest
    /// policy, minimum TCB); the nearest is named with what differs.
    #[arg(long)]
    reference_values: Option<PathBuf>,
    /// The release key's issuer id (sha256 of its public key) the
    /// reference values must be signed by. Without it the reference check
    /// fails (a file's own key proves nothing about who wrote it) and
    /// names the key that did sign.
    #[arg(long, requires = "reference_values")]
    issuer: Option<String>,
    /// The runtime handler (the RuntimeClass's, parma-XXXXXXXX) the
    /// reference values must be for: values the same key signed for
    /// another UVM (an older one, say) then fail.
    #[arg(long, requires = "reference_values")]
    expect_handler: Option<String>,
    /// INSECURE: accept a chain rooted elsewhere than AMD (the emulation provider's).
    #[arg(long)]
    allow_insecure_emulation: bool,
    /// Print JSON: every check with its values.
    #[arg(long)]
    json: bool,
}

pub fn execute(args: VerifyArgs) -> anyhow::Result<i32> {
    let bytes = std::fs::read(&args.report).with_context(|| format!("cannot read {}", args.report.display()))?;
    let report = parma_snp::AttestationReport::parse(&bytes)
        .with_context(|| format!("{} is not an SEV-SNP report", args.report.display()))?;
    let certs = match (args.certs, args.vcek) {
        (Some(dir), _) => parma_snp::CertSource::Dir(dir),
        (None, Some(vcek)) => parma_snp::CertSource::Vcek(vcek),
        (None, None) => anyhow::bail!("give --certs DIR or --vcek FILE"),
    };
    let mut expect = parma_snp::Expectations {
        product: args.product,
        min_tcb: args.min_tcb,
        allow_insecure_emulation: args.allow_insecure_emulation,
        ..Default::default()
    };
    if let Some(hex) = &args.expect_measurement {
        expect = expect.measurement_hex(hex)?;
    }
    if let Some(hex) = &args.expect_host_data {
        expect = expect.host_data_hex(hex)?;
    }
    if let Some(text) = &args.expect_report_data {
        expect = expect_report_data(expect, text)?;
    }
    let reference = match &args.reference_values {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let signed = parma_snp::reference::Signed::parse(&bytes)
                .with_context(|| format!("{} cannot be used", path.display()))?;
            let values =
                signed.verify(args.issuer.as_deref()).with_context(|| format!("{} cannot be used", path.display()))?;
            Some((values, signed.issuer()?))
        }
    };
    let verification = parma_snp::verify(&report, &certs, &expect)?;
    let comparison = reference.as_ref().map(|(values, issuer)| {
        (values, issuer, values.compare(&report, verification.product(), expect.host_data.as_ref()))
    });
    // The reference values pass when a launch matches and their signer is
    // the one asked for.
    let handler_ok = |values: &parma_snp::reference::ReferenceValues| {
        args.expect_handler.as_ref().is_none_or(|expected| *expected == values.handler)
    };
    let reference_passed = comparison.as_ref().is_none_or(|(values, _, c)| {
        matches!(c, parma_snp::reference::Comparison::Matches(_)) && args.issuer.is_some() && handler_ok(values)
    });
    let all_passed = verification.all_passed() && reference_passed;
    if args.json {
        let mut json = serde_json::to_value(&verification)?;
        if let Some(object) = json.as_object_mut() {
            if let Some((values, issuer, comparison)) = &comparison {
                object.insert(
                    "reference_values".into(),
                    serde_json::json!({
                        "handler": values.handler,
                        "issuer": issuer,
                        "issuer_checked": args.issuer.is_some(),
                        "handler_checked": args.expect_handler.is_some(),
                        "host_data_checked": expect.host_data.is_some(),
                        "comparison": comparison,
                        "passed": reference_passed,
                    }),
                );
            }
            object.insert("all_passed".into(), serde_json::Value::Bool(all_passed));
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for check in verification.checks() {
            let mut line = format!("{}  {}", if check.passed { "pass" } else { "FAIL" }, check.name);
            if let Some(actual) = &check.actual {
                line.push_str(&format!(": {actual}"));
            }
            if !check.passed {
                if let Some(expected) = &check.expected {
                    line.push_str(&format!(" (expected {expected})"));
                }
                if let Some(detail) = &check.detail {
                    line.push_str(&format!(" ({detail})"));
                }
            }
            println!("{line}");
        }
        if let Some((values, issuer, comparison)) = &comparison {
            match &args.expect_handler {
                Some(expected) if !handler_ok(values) => println!(
                    "FAIL  reference_values: they are for {}, not for {expected} (--expect-handler)",
                    values.handler
                ),
                _ => {
                    let checked = Checked { issuer: args.issuer.is_some(), host_data: expect.host_data.is_some() };
                    println!("{}", reference_line(values, issuer, comparison, checked));
                }
            }
        }
        if verification.insecure_emulation() {
            println!("WARNING: the chain is not AMD's (insecure emulation): this report proves nothing about hardware");
        }
        let checks = verification.checks().len() + usize::from(comparison.is_some());
        let failed = verification.failed().count() + usize::from(!reference_passed);
        println!("{checks} checks, {} passed, {failed} failed", checks - failed);
    }
    // 2: the report failed a check (1: parma could not check it).
    Ok(if all_passed { 0 } else { 2 })
}

/// What the reference check was given to check besides the launches.
#[derive(Clone, Copy)]
struct Checked {
    /// `--issuer`: the signer.
    issuer: bool,
    /// `--expect-host-data`: the pod's policy.
    host_data: bool,
}

/// The reference values' verdict as one line.
fn reference_line(
    values: &parma_snp::reference::ReferenceValues,
    issuer: &str,
    comparison: &parma_snp::reference::Comparison,
    checked: Checked,
) -> String {
    use parma_snp::reference::Comparison;
    match comparison {
        Comparison::Matches(launch) if !checked.issuer => format!(
            "FAIL  reference_values: {} {} matches, but the values' signer was not checked: they are signed by \
             the key with issuer id {issuer}; pass --issuer with your release key's id",
            values.handler,
            launch.describe()
        ),
        Comparison::Matches(launch) => format!(
            "pass  reference_values: {} {}{}",
            values.handler,
            launch.describe(),
            if checked.host_data {
                ""
            } else {
                "; HOST_DATA not checked (--expect-host-data gives the pod's policy hash)"
            }
        ),
        Comparison::Empty => format!("FAIL  reference_values: {} lists no launch", values.handler),
        Comparison::Nearest { launch, differences } => {
            let fields: Vec<String> = differences
                .iter()
                .map(|d| format!("{} (expected {}, got {})", d.field, d.expected, d.actual))
                .collect();
            format!(
                "FAIL  reference_values: no launch of {} matches; the nearest, {}, differs in {}",
                values.handler,
                launch.describe(),
                fields.join("; ")
            )
        }
    }
}

/// `--expect-report-data DOMAIN:HEX`.
fn expect_report_data(expect: parma_snp::Expectations, text: &str) -> anyhow::Result<parma_snp::Expectations> {
    use parma_snp::report_data::{Domain, LABELS};
    let domains = || LABELS.join(", ");
    let Some((label, rest)) = text.split_once(':') else {
        anyhow::bail!(
            "--expect-report-data names whose REPORT_DATA it is: {} or raw:HEX (the agent never signs the host's \
             bytes as they are)",
            domains()
        );
    };
    if label == "raw" {
        return Ok(expect.report_data_hex(rest)?);
    }
    match Domain::parse(text) {
        Some((domain, hex)) => Ok(expect.report_data_in(domain, hex)?),
        None if label == "container" => anyhow::bail!("--expect-report-data: a container's is container:NAME:HEX"),
        None => anyhow::bail!("--expect-report-data: no domain {label:?} (known: {}, raw:HEX)", domains()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parma_snp::report_data::Domain;

    #[test]
    fn report_data_expectations_name_their_domain() {
        let none = parma_snp::Expectations::default;
        let host = expect_report_data(none(), "host:5a5a").unwrap();
        let mut data = [0u8; 64];
        data[..2].copy_from_slice(&[0x5a, 0x5a]);
        assert_eq!(host.report_data, Some(Domain::Host.report_data(&data)));
        assert_eq!(expect_report_data(none(), "raw:5a5a").unwrap().report_data, Some(data));
        // The empty host data is a value too (the CLI's default).
        assert_eq!(expect_report_data(none(), "host:").unwrap().report_data, Some(Domain::Host.report_data(&[0; 64])));
        let err = expect_report_data(none(), "5a5a").unwrap_err().to_string();
        assert!(err.contains("host:HEX") && err.contains("raw:HEX"), "{err}");
        let err = expect_report_data(none(), "broker:5a").unwrap_err().to_string();
        assert!(err.contains("no domain \"broker\""), "{err}");
        assert!(expect_report_data(none(), "host:zz").is_err());
        let web = expect_report_data(none(), "container:web:5a5a").unwrap();
        assert_eq!(web.report_data, Some(Domain::Container("web").report_data(&data)));
        let err = expect_report_data(none(), "container:5a5a").unwrap_err().to_string();
        assert!(err.contains("container:NAME:HEX"), "{err}");
        assert!(expect_report_data(none(), &format!("host:{}", "00".repeat(65))).is_err());
    }
}
