//! `kubectl weft` (the `kubectl-weft` binary on the PATH): weft in a cluster, read from the
//! Kubernetes API with the kubeconfig kubectl uses.
//!
//! - `status`: per node, the Networks realized, weft's bridges, the workload endpoints and the
//!   agent's conditions (the NodeNetworks' status);
//! - `endpoints POD`: the pod's weft interfaces on every Network (node, addresses, MAC, VM) and
//!   the segmentation policies that apply to it;
//! - `trace --from A --to B --port P`: the verdict the nodes give a packet, and the rule;
//! - `audit [--follow]`: the agents' audit records (from their logs).

mod view;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, LogParams};
use std::process::ExitCode;
use weft_crds::NodeNetwork;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-weft",
    bin_name = "kubectl weft",
    version,
    about = "weft's nodes, a pod's interfaces and policies, a packet's verdict and the audit records, from the cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per node: the Networks realized, weft's bridges, the workload endpoints and what is wrong.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A pod's weft interfaces (node, Network, addresses, MAC, VM) and the policies that apply
    /// to it.
    Endpoints {
        /// The pod (`name` or `namespace/name`).
        pod: String,
        /// The pod's namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Whether the nodes let a packet from one workload (or address) to another through, and by
    /// which rule; exits 1 when they drop it.
    Trace {
        /// Source: `namespace/name[@network]` or an address.
        #[arg(long)]
        from: String,
        /// Destination: `namespace/name[@network]` or an address.
        #[arg(long)]
        to: String,
        /// The packet and the output.
        #[command(flatten)]
        packet: weft_operator::cli::TracePacket,
    },
    /// The agents' audit records (decisions of policy rules with `log: true`, and drops by a
    /// default), one JSON line each, read from the agents' logs.
    Audit {
        /// Keep printing new records.
        #[arg(short, long)]
        follow: bool,
        /// Only this node's agent.
        #[arg(long)]
        node: Option<String>,
        /// Only records of the last this many seconds.
        #[arg(long)]
        since_seconds: Option<i64>,
        /// The namespace weft is installed in.
        #[arg(long, default_value = "weft-system")]
        weft_namespace: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl weft: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubectl weft: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let client = Client::try_default()
        .await
        .context("no cluster to talk to (set KUBECONFIG, or run in a pod)")?;
    match command {
        Command::Status { json } => {
            let lines = view::node_lines(&node_networks(&client).await?);
            if json {
                println!("{:#}", view::node_lines_json(&lines));
            } else if lines.is_empty() {
                println!(
                    "no node runs weft yet (no NodeNetwork): is it installed, and does a Network select nodes?"
                );
            } else {
                print!("{}", view::node_table(&lines));
            }
        }
        Command::Endpoints {
            pod,
            namespace,
            json,
        } => {
            let (namespace, name) = match pod.split_once('/') {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => (namespace, pod),
            };
            let found = view::interfaces_of(&node_networks(&client).await?, &namespace, &name);
            if found.is_empty() {
                anyhow::bail!(
                    "pod {namespace}/{name} has no weft interface: no node's agent publishes one (is it running, on a node with weft, and attached to a weft Network?)"
                );
            }
            let policies = policies_of(&client, &namespace, &name).await?;
            if json {
                println!("{:#}", view::interfaces_json(&found, &policies));
            } else {
                print!("{}", view::interface_table(&found, &policies));
            }
        }
        Command::Trace { from, to, packet } => {
            let allowed = weft_operator::policy::cluster::trace(
                &client,
                &from,
                &to,
                packet.port,
                &packet.protocol,
                packet.ipv6,
                packet.json,
            )
            .await?;
            return Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Audit {
            follow,
            node,
            since_seconds,
            weft_namespace,
        } => audit(&client, follow, node, since_seconds, &weft_namespace).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn node_networks(client: &Client) -> anyhow::Result<Vec<NodeNetwork>> {
    let api: Api<NodeNetwork> = Api::all(client.clone());
    Ok(api
        .list(&ListParams::default())
        .await
        .context("cannot list NodeNetworks (is weft installed?)")?
        .items)
}

/// The policies that apply to the pod: compiled as the agents compile them, with the pod's
/// interfaces as the only ones enforced here.
async fn policies_of(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let (res, mut members) = weft_operator::policy::cluster::snapshot(client).await?;
    for m in &mut members {
        m.local = m.namespace == namespace && m.name == name;
    }
    let compiled = weft_operator::policy::compile_resources(&res, &members);
    Ok(compiled
        .applies_to
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(p, _)| p.clone())
        .collect())
}

/// Prints the audit records of the agents' logs, every agent's as they come.
async fn audit(
    client: &Client,
    follow: bool,
    node: Option<String>,
    since_seconds: Option<i64>,
    weft_namespace: &str,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), weft_namespace);
    let agents = pods
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=weft,app.kubernetes.io/component=agent"),
        )
        .await
        .with_context(|| format!("cannot list weft's agent pods in namespace {weft_namespace}"))?;
    let agents: Vec<Pod> = agents
        .items
        .into_iter()
        .filter(|p| {
            node.as_deref()
                .is_none_or(|n| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n))
        })
        .collect();
    if agents.is_empty() {
        anyhow::bail!(
            "no weft agent pod{} in namespace {weft_namespace} (--weft-namespace names where weft is installed)",
            node.map(|n| format!(" on node {n}")).unwrap_or_default()
        );
    }
    let params = LogParams {
        container: Some("agent".into()),
        follow,
        since_seconds,
        ..LogParams::default()
    };
    let mut streams = Vec::new();
    for pod in &agents {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let lines = pods
            .log_stream(&name, &params)
            .await
            .with_context(|| format!("cannot read the log of agent pod {name}"))?
            .lines();
        streams.push(lines.boxed());
    }
    let mut all = futures::stream::select_all(streams);
    while let Some(line) = all.next().await {
        let line = line.context("reading an agent's log")?;
        if view::audit_record(&line).is_some() {
            println!("{}", line.trim_end());
        }
    }
    Ok(())
}
