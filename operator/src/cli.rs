//! Command-line interface of `weft-operator`.

use crate::agent::{self, AgentConfig, install::CniInstall, plan::NodeContext};
use crate::controller::opts::ControllerOpts;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use weft_dataplane::names;

/// weft: NAT and bridge networks for pods and VMs, with microsegmentation.
#[derive(Debug, Parser)]
#[command(name = "weft-operator", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "WEFT_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (or `agent cleanup` to remove everything weft created on the node).
    Agent(Box<AgentArgs>),
    /// Run the cluster controller: validates resources, allocates per-node address blocks into
    /// `NodeNetwork`s, writes status (one active replica, through a Lease).
    Controller(ControllerOpts),
    /// Answer "from A to B on port P: accepted or denied, by which policy and rule" for the
    /// cluster, with the compiler the agent uses. Exits 0 when accepted, 1 when denied. (A lab
    /// file's is `weft-lab trace --file FILE`.)
    Trace(TraceArgs),
    /// Wait until the cleanup DaemonSet of `helm uninstall` has run on every node it is
    /// scheduled to, then delete it (the chart's post-delete hook Job).
    UninstallWait(UninstallWaitArgs),
}

/// `uninstall-wait` flags.
#[derive(Debug, Args)]
pub struct UninstallWaitArgs {
    /// Namespace of the DaemonSet.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Name of the cleanup DaemonSet.
    #[arg(long, default_value = "weft-cleanup")]
    pub daemonset: String,
    /// Seconds to wait before deleting it anyway (nodes that did not run it are named).
    #[arg(long, default_value_t = 120)]
    pub timeout_seconds: u64,
}

/// Trace flags.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Trace against the cluster (kubeconfig, or the pod's service account): its Networks,
    /// policies and Namespaces, and the workloads of the Networks' WorkloadSlices. The
    /// only mode; the flag may be left out.
    #[arg(long)]
    pub kube: bool,
    /// Source: `namespace/name[@network]` or an address.
    #[arg(long)]
    pub from: String,
    /// Destination: `namespace/name[@network]` or an address.
    #[arg(long)]
    pub to: String,
    /// The packet and the output.
    #[command(flatten)]
    pub packet: TracePacket,
}

/// What a trace sends and how it answers (the cluster's trace and the lab's).
#[derive(Args, Debug)]
pub struct TracePacket {
    /// Destination port (ignored for ICMP).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// tcp, udp, sctp, icmp or icmpv6.
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
    /// Trace IPv6 addresses.
    #[arg(long)]
    pub ipv6: bool,
    /// Print the decision as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Agent flags.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    /// `cleanup`: remove everything weft created on this node.
    #[command(subcommand)]
    pub action: Option<AgentAction>,
    /// Shared agent settings.
    #[command(flatten)]
    pub opts: AgentOpts,
}

/// Agent sub-actions.
#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Remove every link, rule, state file and CNI file weft created on this node.
    Cleanup(Box<AgentOpts>),
    /// Forget the addresses and MAC kept on this node for a VM that is gone for good (with
    /// `--kube` and KubeVirt installed the agent does this itself once the VM is deleted).
    ForgetVm {
        /// The VM's identity, `namespace/name`.
        vm: String,
        /// weft's state dir.
        #[arg(long, env = "WEFT_STATE_DIR", default_value = names::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// Settings of the agent.
#[derive(Debug, Args, Clone)]
pub struct AgentOpts {
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME", default_value_t = crate::default_hostname())]
    pub node_name: String,
    /// This node's labels (`k=v,k2=v2`), matched against Network nodeSelectors (with
    /// `--kube`, the labels of the Node object are used instead).
    #[arg(long, env = "WEFT_NODE_LABELS", default_value = "")]
    pub node_labels: String,
    /// All nodes of the cluster (comma-separated), for the standalone address-block assignment
    /// (with `--kube`, the controller assigns the blocks).
    #[arg(long, env = "WEFT_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Directory of YAML manifests (what `kubectl apply` takes), re-read on change.
    #[arg(long, env = "WEFT_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// weft's state dir.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = names::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The agent's CNI socket.
    #[arg(long, env = "WEFT_AGENT_SOCKET", default_value = names::DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// CNI binary directory.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = names::DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// CNI configuration directory.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = names::DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The `weft` binary to install (default: next to this executable).
    #[arg(long, env = "WEFT_CNI_BINARY")]
    pub cni_binary: Option<PathBuf>,
    /// The network named in the conflist (default: the Network annotated
    /// `weft.dev/default-network: "true"`, else the only Network on the node, else the
    /// alphabetically first NAT Network on it).
    #[arg(long, env = "WEFT_DEFAULT_NETWORK")]
    pub default_network: Option<String>,
    /// Full resync period in seconds.
    #[arg(long, env = "WEFT_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Enter this network namespace before anything else (the lab runs one agent per node
    /// namespace this way).
    #[arg(long, env = "WEFT_NETNS")]
    pub netns: Option<PathBuf>,
    /// Read resources from the Kubernetes API (in-cluster config or KUBECONFIG) instead of
    /// `--manifests`.
    #[arg(long, env = "WEFT_KUBE", conflicts_with = "manifests")]
    pub kube: bool,
    /// Address of the agent's `/metrics`, `/healthz` and `/readyz` (none when absent).
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Remove weft's conflist when the agent exits (Helm uninstall must not leave it behind:
    /// a conflist without a running agent breaks every new pod). Re-written at start.
    #[arg(long, env = "WEFT_CLEANUP_CONFIG_ON_EXIT")]
    pub cleanup_config_on_exit: bool,
    /// Append audit records (JSON lines: policy decisions of rules with `log: true` and default
    /// drops) to this file; standard output when absent.
    #[arg(long, env = "WEFT_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Export each workload interface's traffic on /metrics (`weft_agent_workload_bytes_total`,
    /// `_packets_total`, `_drops_total`): one series per interface and direction, so the
    /// number of series grows with the node's workloads.
    #[arg(long, env = "WEFT_WORKLOAD_METRICS")]
    pub workload_metrics: bool,
    /// The CIDRs a TrafficMirror's remote collector may be in (comma-separated, e.g.
    /// `10.20.0.0/24`): the agent sends VXLAN copies from the node only to these. None
    /// (the default): remote collectors are refused, analyzers on the node still work.
    #[arg(long, env = "WEFT_MIRROR_COLLECTORS", value_delimiter = ',')]
    pub mirror_collectors: Vec<ipnet::IpNet>,
    /// A workload interface whose packets per second (in and out together) go above this is
    /// an anomaly: an audit record, `weft_agent_anomalies_total{kind="packet-rate"}` and, in a
    /// cluster, an Event on its pod. Unset: only crossings of a workload's limits are.
    #[arg(long, env = "WEFT_ANOMALY_PACKETS_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
    pub anomaly_packets_per_second: Option<u64>,
    /// Likewise for new connections per second opened by and to a workload interface
    /// (`kind="connection-rate"`): a SYN flood, a scan.
    #[arg(long, env = "WEFT_ANOMALY_CONNECTIONS_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
    pub anomaly_connections_per_second: Option<u64>,
    /// Allow SYN proxies (PortForwards' `spec.synProxy`). This sets the node's
    /// `net.netfilter.nf_conntrack_tcp_loose` to 0, which a SYN proxy needs (the client's
    /// handshake-completing ACK must be seen as a new, untracked packet): connection tracking
    /// then no longer picks up TCP connections in mid-stream, so connections that were open
    /// before conntrack started (or its table was flushed) are not re-learned on the node.
    #[arg(long, env = "WEFT_SYN_PROXY")]
    pub syn_proxy: bool,
    /// Standalone (`--manifests`): a directory the nodes' agents share (e.g. over NFS), where each
    /// writes its workload interfaces (`<node>.json`) and reads the others', so policies match
    /// workloads on every node. Cluster mode shares them through the NodeNetwork status.
    #[arg(long, env = "WEFT_PEERS_DIR", conflicts_with = "kube")]
    pub peers_dir: Option<PathBuf>,
}

/// Sets up tracing from `WEFT_LOG` (default `info`; `warn` for `trace`).
pub fn init_tracing(cli: &Cli) {
    init_tracing_with(
        cli.log_format,
        match cli.command {
            Command::Trace(_) => "warn",
            Command::Agent(_) | Command::Controller(_) | Command::UninstallWait(_) => "info",
        },
    );
}

/// Sets up tracing on standard error in `format`, filtered by `WEFT_LOG`, else by `default`
/// (`weft-lab` uses it too).
pub fn init_tracing_with(format: LogFormat, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--node-labels: {pair:?} is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

impl AgentOpts {
    /// The agent configuration.
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        Ok(AgentConfig {
            node: NodeContext {
                name: self.node_name.clone(),
                labels: parse_labels(&self.node_labels)?,
                syn_proxy: self.syn_proxy,
                // The agent's own listening port on the node's addresses (it runs in the
                // node's network namespace): kubelet's probes of the agent go there.
                own_tcp_ports: self.metrics_addr.map(|a| a.port()).into_iter().collect(),
            },
            nodes: self.nodes.clone(),
            state_dir: self.state_dir.clone(),
            socket: self.socket.clone(),
            cni: CniInstall {
                bin_dir: self.cni_bin_dir.clone(),
                conf_dir: self.cni_conf_dir.clone(),
                binary: self
                    .cni_binary
                    .clone()
                    .unwrap_or_else(agent::install::default_cni_binary),
                state_dir: self.state_dir.clone(),
                socket: self.socket.clone(),
            },
            default_network: self.default_network.clone(),
            agent_ports: Vec::new(),
            cleanup_config_on_exit: self.cleanup_config_on_exit,
            resync: Duration::from_secs(self.resync_seconds.max(1)),
            poll: Duration::from_millis(500),
            audit_log: self.audit_log.clone(),
            workload_metrics: self.workload_metrics,
            mirror_collectors: self.mirror_collectors.clone(),
            anomaly_thresholds: crate::agent::anomaly::Thresholds {
                packets_per_second: self.anomaly_packets_per_second,
                connections_per_second: self.anomaly_connections_per_second,
            },
        })
    }
}

fn enter_netns(path: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(p) = path {
        // Before any runtime thread exists: every thread the agent starts inherits it.
        let ns = weft_dataplane::netns::Netns::open(p)?;
        std::mem::forget(weft_dataplane::netns::enter(&ns)?);
    }
    Ok(())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => match args.action {
            Some(AgentAction::ForgetVm { vm, state_dir }) => {
                let (forgotten, attached) = agent::forget_vm(&state_dir, &vm)?;
                for network in &forgotten {
                    eprintln!("forgot VM {vm}'s addresses on network {network}");
                }
                for network in &attached {
                    eprintln!(
                        "VM {vm} is attached on network {network}: its addresses are kept; stop the VM first"
                    );
                }
                if forgotten.is_empty() && attached.is_empty() {
                    eprintln!("no addresses are kept for VM {vm} on this node");
                }
                Ok(if attached.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Some(AgentAction::Cleanup(opts)) => {
                enter_netns(&opts.netns)?;
                for line in agent::cleanup(&opts.config()?)? {
                    eprintln!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            None => {
                let opts = args.opts;
                enter_netns(&opts.netns)?;
                let cfg = opts.config()?;
                let manifests = match (&opts.manifests, opts.kube) {
                    (Some(dir), false) => Some(dir.clone()),
                    (None, true) => None,
                    _ => anyhow::bail!(
                        "the agent needs one source of resources: --kube (the Kubernetes API) or --manifests DIR (YAML files)"
                    ),
                };
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let source: Box<dyn agent::source::ResourceSource> = match manifests {
                        Some(dir) => {
                            let source = agent::source::ManifestSource::new(dir);
                            Box::new(
                                match &opts.peers_dir {
                                    Some(peers) => source.with_peers(peers, &opts.node_name),
                                    None => source,
                                }
                                .watched(),
                            )
                        }
                        None => {
                            let client = kube::Client::try_default().await.map_err(|e| {
                                anyhow::anyhow!(
                                    "--kube: cannot configure the Kubernetes client (in-cluster or KUBECONFIG): {}",
                                    crate::error_chain(&e)
                                )
                            })?;
                            Box::new(agent::kube::KubeSource::start(client, &cfg.node.name))
                        }
                    };
                    agent::run(cfg, source, opts.metrics_addr).await
                })?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Controller(opts) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(crate::controller::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::UninstallWait(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (progress, released) = rt.block_on(async {
                let client = kube::Client::try_default().await?;
                let progress = crate::uninstall::wait_and_delete(
                    client.clone(),
                    &args.namespace,
                    &args.daemonset,
                    std::time::Duration::from_secs(args.timeout_seconds),
                )
                .await?;
                // Without a controller nothing else would ever take the finalizer off.
                let released = crate::uninstall::release_networks(client).await;
                Ok::<_, kube::Error>((progress, released))
            })?;
            match released {
                Ok(0) => {}
                Ok(n) => eprintln!(
                    "took the weft.dev/cleanup finalizer off {n} Network(s): they can be deleted without a controller"
                ),
                Err(e) => eprintln!(
                    "cannot take the weft.dev/cleanup finalizer off the Networks ({e}); remove it by hand before deleting them: kubectl patch network NAME --type=merge -p '{{\"metadata\":{{\"finalizers\":null}}}}'"
                ),
            }
            match progress {
                Some(p) if p.complete() => {
                    eprintln!("weft cleaned up on {} node(s)", p.done)
                }
                Some(p) => eprintln!(
                    "weft cleaned up on {} of {} node(s) within {} s; run `weft-operator agent cleanup` on the others",
                    p.done, p.desired, args.timeout_seconds
                ),
                None => eprintln!("the cleanup DaemonSet {} never reported", args.daemonset),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace(t) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let accepted = rt.block_on(async {
                let client = kube::Client::try_default().await.map_err(|e| {
                    anyhow::anyhow!(
                        "no cluster to talk to (set KUBECONFIG or run in a pod; a lab file is traced by `weft-lab trace --file FILE`): {e}"
                    )
                })?;
                crate::policy::cluster::trace(
                    &client,
                    &t.from,
                    &t.to,
                    t.packet.port,
                    &t.packet.protocol,
                    t.packet.ipv6,
                    t.packet.json,
                )
                .await
            })?;
            Ok(if accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_needs_kube_or_manifests_and_not_both() {
        let cli = Cli::try_parse_from(["weft-operator", "agent", "--node-name", "a"]).unwrap();
        let err = run(cli).unwrap_err().to_string();
        assert!(
            err.contains("--kube") && err.contains("--manifests"),
            "{err}"
        );
        let both =
            Cli::try_parse_from(["weft-operator", "agent", "--kube", "--manifests", "/tmp/m"]);
        assert!(both.is_err(), "--kube and --manifests together");
        let cli = Cli::try_parse_from([
            "weft-operator",
            "agent",
            "--kube",
            "--metrics-addr=0.0.0.0:9465",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("not the agent")
        };
        assert!(args.opts.kube);
        assert_eq!(
            args.opts.metrics_addr,
            Some("0.0.0.0:9465".parse().unwrap())
        );
    }

    #[test]
    fn trace_is_the_clusters_and_takes_no_lab_file() {
        for argv in [
            &[
                "weft-operator",
                "trace",
                "--from",
                "a/b",
                "--to",
                "10.0.0.1",
            ][..],
            &[
                "weft-operator",
                "trace",
                "--kube",
                "--from",
                "a/b",
                "--to",
                "c/d",
            ],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert!(matches!(cli.command, Command::Trace(_)), "{argv:?}");
        }
        let file = Cli::try_parse_from([
            "weft-operator",
            "trace",
            "lab.yaml",
            "--from",
            "a",
            "--to",
            "b",
        ]);
        assert!(file.is_err(), "a lab file is weft-lab's");
        assert!(Cli::try_parse_from(["weft-operator", "lab", "lab.yaml"]).is_err());
    }
}
