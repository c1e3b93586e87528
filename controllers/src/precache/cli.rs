//! `larder precache add|list|info|delete`: the Precache resource for people who prefer a
//! command to YAML. Tables are rendered by pure functions; the commands only fetch and print.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt as _};
use larder_core::crd::{MaxConcurrent, Precache, PrecacheSpec, ReadinessGate, Refresh, SecretRef};
use larder_core::reference::Reference;

use crate::{Error, Result};

/// `larder precache …`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrecacheArgs {
    #[command(subcommand)]
    pub command: PrecacheCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PrecacheCommand {
    /// Create or update a Precache (server-side apply: re-running with other flags updates it).
    Add(AddArgs),
    /// One line per Precache.
    List,
    /// Every image and node of one Precache.
    Info {
        /// The Precache's name.
        name: String,
    },
    /// Delete a Precache (its images are released to the normal retention).
    Delete {
        /// The Precache's name.
        name: String,
    },
}

/// The `maxItems` of `spec.images` in the Precache schema (`PRECACHE_MAX_IMAGES` in core, not
/// exported; a test checks the two agree), checked here so `add` fails before sending.
pub const PRECACHE_MAX_IMAGES: usize = 256;

/// `larder precache add`.
#[derive(clap::Args, Debug, Clone)]
pub struct AddArgs {
    /// The Precache's name.
    pub name: String,
    /// Images to cache, as a pod names them.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Also put the images on nodes with this label (KEY=VALUE, repeatable; all must match).
    #[arg(long = "node-selector", value_parser = parse_label)]
    pub node_selector: Vec<(String, String)>,
    /// Put the images on every node.
    #[arg(long, conflicts_with = "node_selector")]
    pub all_nodes: bool,
    /// Cron expression (five fields, UTC, or @daily…) on which tags are re-resolved and nodes
    /// re-checked.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Images one node downloads at once.
    #[arg(long, default_value_t = MaxConcurrent::DEFAULT_PER_NODE)]
    pub max_per_node: u32,
    /// Nodes downloading at once (rolling wave).
    #[arg(long, default_value_t = MaxConcurrent::DEFAULT_NODES)]
    pub max_nodes: u32,
    /// When tags are re-resolved: Always, OnSchedule or Never.
    #[arg(long, default_value = "Always", value_parser = parse_refresh)]
    pub refresh: Refresh,
    /// A dockerconfigjson Secret for private images, NAMESPACE/NAME (repeatable).
    #[arg(long = "pull-secret", value_parser = parse_secret)]
    pub pull_secrets: Vec<SecretRef>,
    /// Gate node readiness: selected nodes registered with the taint
    /// `larder.dev/precache-pending:NoSchedule` keep it until the images are on their disks,
    /// at most this long (e.g. `10m`), see docs/precache.md.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub readiness_gate: Option<std::time::Duration>,
}

fn parse_secret(s: &str) -> std::result::Result<SecretRef, String> {
    match s.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(SecretRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!("`{s}` is not NAMESPACE/NAME")),
    }
}

fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_refresh(s: &str) -> std::result::Result<Refresh, String> {
    match s {
        "Always" => Ok(Refresh::Always),
        "OnSchedule" => Ok(Refresh::OnSchedule),
        "Never" => Ok(Refresh::Never),
        other => Err(format!("`{other}`: expected Always, OnSchedule or Never")),
    }
}

/// Runs one subcommand against the cluster in the environment (`KUBECONFIG` or in-cluster),
/// printing to stdout.
pub async fn run(args: PrecacheArgs) -> Result<()> {
    let client = kube::Client::try_default().await?;
    let api: Api<Precache> = Api::all(client);
    match args.command {
        PrecacheCommand::Add(add) => {
            let spec = add_spec(&add)?;
            let name = add.name;
            let pc = Precache::new(&name, spec);
            let params = PatchParams::apply("larder-cli").force();
            api.patch(&name, &params, &Patch::Apply(&pc)).await?;
            println!("precache/{name} applied; `larder precache info {name}` shows progress");
        }
        PrecacheCommand::List => {
            let list = api.list(&Default::default()).await?;
            print!("{}", render_list(&list.items, Timestamp::now()));
        }
        PrecacheCommand::Info { name } => {
            let pc = api.get(&name).await?;
            print!("{}", render_info(&pc));
        }
        PrecacheCommand::Delete { name } => {
            api.delete(&name, &DeleteParams::default()).await?;
            println!("precache/{name} deleted");
        }
    }
    Ok(())
}

/// The spec `add` applies, checked before anything is sent.
pub fn add_spec(add: &AddArgs) -> Result<PrecacheSpec> {
    if add.images.len() > PRECACHE_MAX_IMAGES {
        return Err(Error::Config(format!(
            "{} images: a Precache lists at most {PRECACHE_MAX_IMAGES}",
            add.images.len()
        )));
    }
    for image in &add.images {
        Reference::parse(image).map_err(|source| Error::Reference {
            reference: image.clone(),
            source,
        })?;
    }
    if let Some(s) = &add.schedule {
        super::schedule::Schedule::parse(s).map_err(|e| Error::Config(e.to_string()))?;
    }
    if add.max_per_node == 0 || add.max_nodes == 0 {
        return Err(Error::Config(
            "--max-per-node and --max-nodes must be at least 1".into(),
        ));
    }
    let node_selector = if add.all_nodes {
        Some(BTreeMap::new())
    } else if add.node_selector.is_empty() {
        None
    } else {
        Some(add.node_selector.iter().cloned().collect())
    };
    Ok(PrecacheSpec {
        images: add.images.clone(),
        schedule: add.schedule.clone(),
        node_selector,
        max_concurrent: MaxConcurrent {
            per_node: add.max_per_node,
            nodes: add.max_nodes,
        },
        refresh: add.refresh,
        pull_secrets: add.pull_secrets.clone(),
        readiness_gate: add
            .readiness_gate
            .map(|d| {
                u32::try_from(d.as_secs())
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .map(|timeout_seconds| ReadinessGate { timeout_seconds })
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "--readiness-gate {}: between 1s and 24h",
                            humantime::format_duration(d)
                        ))
                    })
            })
            .transpose()?,
    })
}

/// Columns padded to their widest cell, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(m) => *m = (*m).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes as B, KiB, MiB, GiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn age(created: Option<Timestamp>, now: Timestamp) -> String {
    let Some(created) = created else {
        return "-".into();
    };
    let secs = now.duration_since(created).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `larder precache list`.
pub fn render_list(precaches: &[Precache], now: Timestamp) -> String {
    if precaches.is_empty() {
        return "no precaches\n".into();
    }
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "IMAGES".into(),
        "NODES".into(),
        "SCHEDULE".into(),
        "READY".into(),
        "AGE".into(),
    ]];
    for pc in precaches {
        let st = pc.status.clone().unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("-", |c| c.status.as_str())
            .to_owned();
        rows.push(vec![
            pc.name_any(),
            st.images_summary
                .unwrap_or_else(|| format!("?/{}", pc.spec.images.len())),
            st.nodes_summary.unwrap_or_else(|| "-".into()),
            pc.spec.schedule.clone().unwrap_or_else(|| "-".into()),
            ready,
            age(pc.metadata.creation_timestamp.as_ref().map(|t| t.0), now),
        ]);
    }
    table(&rows)
}

/// `larder precache info NAME`.
pub fn render_info(pc: &Precache) -> String {
    let st = pc.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "Name:      {}", pc.name_any());
    let _ = writeln!(
        out,
        "Schedule:  {}",
        pc.spec.schedule.as_deref().unwrap_or("none")
    );
    if let Some(next) = &st.next_schedule_time {
        let _ = writeln!(out, "Next run:  {}", next.0);
    }
    let nodes = match &pc.spec.node_selector {
        None => "none (cache registry only)".to_owned(),
        Some(s) if s.is_empty() => "every node".to_owned(),
        Some(s) => s
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    };
    let _ = writeln!(out, "Nodes:     {nodes}");
    let _ = writeln!(
        out,
        "Limits:    {} images per node, {} nodes at once; refresh {:?}",
        pc.spec.max_concurrent.per_node, pc.spec.max_concurrent.nodes, pc.spec.refresh
    );
    if let Some(gate) = pc.spec.readiness_gate {
        let _ = writeln!(
            out,
            "Gate:      selected nodes with the {} taint keep it until these images are on their disks, at most {}",
            larder_core::crd::PRECACHE_PENDING_TAINT,
            humantime::format_duration(std::time::Duration::from_secs(u64::from(
                gate.timeout_seconds
            )))
        );
    }
    if !pc.spec.pull_secrets.is_empty() {
        let secrets: Vec<String> = pc
            .spec
            .pull_secrets
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        let _ = writeln!(out, "Secrets:   {}", secrets.join(", "));
    }
    for c in &st.conditions {
        let _ = writeln!(
            out,
            "{}:     {} ({}) {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    out.push('\n');
    let mut rows = vec![vec![
        "IMAGE".to_owned(),
        "PHASE".into(),
        "SIZE".into(),
        "DIGEST".into(),
        "MESSAGE".into(),
    ]];
    for image in &pc.spec.images {
        let s = st.images.iter().find(|i| &i.image == image);
        rows.push(vec![
            image.clone(),
            s.and_then(|s| s.phase)
                .map_or("-".into(), |p| p.to_string()),
            s.and_then(|s| s.size_bytes).map_or("-".into(), human_bytes),
            s.and_then(|s| s.digest.clone())
                .unwrap_or_else(|| "-".into()),
            s.and_then(|s| s.message.clone()).unwrap_or_default(),
        ]);
    }
    out.push_str(&table(&rows));
    if pc.spec.node_selector.is_some() {
        out.push('\n');
        let mut rows = vec![vec![
            "NODE".to_owned(),
            "PHASE".into(),
            "IMAGES".into(),
            "DOWNLOADED".into(),
            "REASON".into(),
        ]];
        for n in &st.nodes {
            rows.push(vec![
                n.node.clone(),
                n.phase.to_string(),
                format!("{}/{}", n.images_ready, st.images_total),
                human_bytes(n.bytes_done),
                n.reason.clone().unwrap_or_default(),
            ]);
        }
        if st.nodes.is_empty() {
            rows.push(vec!["(no node selected yet)".into()]);
        }
        out.push_str(&table(&rows));
        if st.nodes_total as usize > st.nodes.len() {
            let _ = writeln!(
                out,
                "… {} more nodes ({} ready of {})",
                st.nodes_total as usize - st.nodes.len(),
                st.nodes_ready,
                st.nodes_total
            );
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::precache::plan::tests::precache;
    use larder_core::crd::{
        NodeImagePhase, Phase, PrecacheImageStatus, PrecacheNodeStatus, PrecacheStatus,
    };

    /// Parses `larder precache add …` as the binary does.
    fn add(args: &[&str]) -> std::result::Result<AddArgs, clap::Error> {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            add: AddArgs,
        }
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("add").chain(args.iter().copied())).map(|c| c.add)
    }

    #[test]
    fn add_checks_its_input_before_sending_anything() {
        let ok = add_spec(
            &add(&[
                "base",
                "nginx:1.27",
                "--node-selector",
                "pool=gpu",
                "--node-selector",
                "zone=a=b",
                "--schedule",
                "0 3 * * *",
                "--max-per-node",
                "2",
                "--max-nodes",
                "5",
                "--refresh",
                "Never",
                "--pull-secret",
                "team-a/creds",
            ])
            .unwrap(),
        )
        .unwrap();
        let selector = ok.node_selector.unwrap();
        assert_eq!(
            (selector["pool"].as_str(), selector["zone"].as_str()),
            ("gpu", "a=b")
        );
        assert_eq!(
            ok.max_concurrent,
            MaxConcurrent {
                per_node: 2,
                nodes: 5
            }
        );
        assert_eq!(ok.refresh, Refresh::Never);
        assert_eq!(ok.schedule.as_deref(), Some("0 3 * * *"));
        assert_eq!(
            ok.pull_secrets,
            [SecretRef {
                namespace: "team-a".into(),
                name: "creds".into()
            }]
        );
        // Defaults: cache registry only, the resource's own defaults.
        let plain = add_spec(&add(&["base", "nginx"]).unwrap()).unwrap();
        assert_eq!(plain.node_selector, None);
        assert_eq!(plain.max_concurrent, MaxConcurrent::default());
        assert_eq!(plain.refresh, Refresh::Always);
        let all = add_spec(&add(&["base", "nginx", "--all-nodes"]).unwrap()).unwrap();
        assert_eq!(all.node_selector, Some(BTreeMap::new()));
        assert_eq!(plain.readiness_gate, None);
        let gated = add_spec(&add(&["base", "nginx", "--readiness-gate", "10m"]).unwrap()).unwrap();
        assert_eq!(
            gated.readiness_gate,
            Some(ReadinessGate {
                timeout_seconds: 600
            })
        );
        let info = render_info(&Precache::new("base", gated));
        assert!(
            info.contains("larder.dev/precache-pending taint keep it"),
            "{info}"
        );
        assert!(info.contains("at most 10m"), "{info}");
        // Refused before anything is sent, each with what is wrong.
        for (args, says) in [
            (&["base", "Bad Ref"][..], "Bad Ref"),
            (
                &["base", "nginx", "--schedule", "daily"],
                "expected 5 fields",
            ),
            (&["base", "nginx", "--max-per-node", "0"], "at least 1"),
            (&["base", "nginx", "--max-nodes", "0"], "at least 1"),
            (
                &["base", "nginx", "--readiness-gate", "0s"],
                "between 1s and 24h",
            ),
            (
                &["base", "nginx", "--readiness-gate", "25h"],
                "between 1s and 24h",
            ),
        ] {
            let err = add_spec(&add(args).unwrap()).unwrap_err().to_string();
            assert!(err.contains(says), "{args:?}: {err}");
        }
        for (args, says) in [
            (&["base"][..], "IMAGES"),
            (
                &["base", "nginx", "--node-selector", "nokey"],
                "not KEY=VALUE",
            ),
            (&["base", "nginx", "--node-selector", "=v"], "empty key"),
            (
                &["base", "nginx", "--refresh", "sometimes"],
                "expected Always",
            ),
            (
                &["base", "nginx", "--pull-secret", "creds"],
                "NAMESPACE/NAME",
            ),
            (
                &["base", "nginx", "--pull-secret", "a/b/c"],
                "NAMESPACE/NAME",
            ),
            (
                &["base", "nginx", "--all-nodes", "--node-selector", "a=b"],
                "cannot be used",
            ),
        ] {
            let err = add(args).unwrap_err().to_string();
            assert!(err.contains(says), "{args:?}: {err}");
        }
        let many: Vec<String> = (0..=PRECACHE_MAX_IMAGES)
            .map(|i| format!("img{i}"))
            .collect();
        let mut args = vec!["base"];
        args.extend(many.iter().map(String::as_str));
        let err = add_spec(&add(&args).unwrap()).unwrap_err().to_string();
        assert!(err.contains("at most 256"), "{err}");
    }

    #[test]
    fn the_image_limit_is_the_schema_limit() {
        use kube::CustomResourceExt as _;
        let crd = serde_json::to_value(Precache::crd()).unwrap();
        let images = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["images"];
        assert_eq!(images["maxItems"], PRECACHE_MAX_IMAGES, "{images}");
    }

    #[test]
    fn tables_align_and_show_progress() {
        let mut pc = precache("base-images", &["nginx:1.27", "busybox"], Some(&[]));
        pc.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-22T10:00:00Z".parse().unwrap(),
            ));
        pc.status = Some(PrecacheStatus {
            images: vec![PrecacheImageStatus {
                image: "nginx:1.27".into(),
                cached_image: None,
                phase: Some(Phase::Ready),
                digest: Some("sha256:ab".into()),
                size_bytes: Some(3 << 20),
                message: None,
            }],
            nodes: vec![PrecacheNodeStatus {
                node: "worker-1".into(),
                phase: NodeImagePhase::Caching,
                images_ready: 1,
                bytes_done: 1536,
                reason: None,
            }],
            images_ready: 1,
            images_total: 2,
            nodes_total: 3,
            images_summary: Some("1/2".into()),
            nodes_summary: Some("0/3".into()),
            ..PrecacheStatus::default()
        });
        let now: Timestamp = "2026-11-22T13:00:00Z".parse().unwrap();
        let list = render_list(std::slice::from_ref(&pc), now);
        assert_eq!(
            list,
            "NAME         IMAGES  NODES  SCHEDULE  READY  AGE\nbase-images  1/2     0/3    -         -      3h\n"
        );
        let info = render_info(&pc);
        assert!(info.contains("Nodes:     every node"), "{info}");
        assert!(
            info.contains("nginx:1.27  Ready  3.0 MiB  sha256:ab"),
            "{info}"
        );
        assert!(info.contains("busybox     -      -        -"), "{info}");
        assert!(
            info.contains("worker-1  Caching  1/2     1.5 KiB"),
            "{info}"
        );
        assert!(info.contains("… 2 more nodes (0 ready of 3)"), "{info}");
        assert_eq!(render_list(&[], now), "no precaches\n");
        assert_eq!(human_bytes(512), "512 B");
    }
}
