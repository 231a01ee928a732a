//! The `weft` CNI plugin (CNI spec 1.1; also accepts 0.3.x, 0.4.0 and 1.0.0 configurations).
//!
//! `stdout` is the protocol: only [`reply`] writes to it. Logs go to stderr and, when the node
//! names one (`WEFT_LOG_FILE`; never the network configuration), to that file.

#![deny(clippy::print_stdout)]

pub mod attach;
pub mod conf;
pub mod error;
pub mod gc;
pub mod reply;

use conf::{Command, Invocation};
use error::CniError;
use std::io::{IsTerminal, Read};
use std::sync::Mutex;
use tracing::error;

/// Reads the invocation from the process environment and stdin. An error comes with the
/// spec version to answer in (the configuration's when it names a supported one).
pub fn read_invocation() -> Result<Invocation, (String, CniError)> {
    let get = |k: &str| std::env::var(k).ok();
    let current = || conf::CURRENT_VERSION.to_string();
    let command = conf::command_from_env(&get).map_err(|e| (current(), e))?;
    let env = conf::env_from(&get).map_err(|e| (current(), e))?;
    // Room for a whole configuration at once: read into a vector without it, stdin takes
    // a system call for every doubling of the vector.
    let mut stdin = Vec::with_capacity(16 * 1024);
    if command == Command::Version {
        // The runtime sends `{"cniVersion": …}`; a person at a terminal sends nothing.
        if !std::io::stdin().is_terminal() {
            let _ = std::io::stdin().read_to_end(&mut stdin);
        }
        return Ok(Invocation {
            command,
            cni_version: conf::reply_version(&stdin),
            env,
            conf: None,
        });
    }
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        let e = CniError::new(
            error::IO_FAILURE,
            "cannot read the network configuration",
            format!("stdin: {e}"),
        );
        (current(), e)
    })?;
    // The version to answer an error in is looked for only when there is an error: a
    // configuration that parses names a supported one.
    let parsed = if command == Command::Del {
        conf::parse_conf_for_del(&stdin, &env)
    } else {
        conf::parse_conf(&stdin, &env)
    };
    let conf = parsed.map_err(|e| (conf::reply_version(&stdin), e))?;
    conf::require_command_in_version(command, &conf.cni_version)
        .map_err(|e| (conf.cni_version.clone(), e))?;
    Ok(Invocation {
        command,
        cni_version: conf.cni_version.clone(),
        env,
        conf: Some(conf),
    })
}

/// Opens the node's log file for appending: never through a symlink (`O_NOFOLLOW`), created
/// readable by root only.
fn open_log_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)
}

fn init_logging(conf: &conf::Conf) {
    let file = conf.log_file.as_ref().and_then(|p| match open_log_file(p) {
        Ok(f) => Some(f),
        Err(e) => {
            // Logs never go to stdout; say once on stderr why the file gets none.
            eprintln!("weft: not logging to {}: {e}", p.display());
            None
        }
    });
    let builder = tracing_subscriber::fmt()
        .with_max_level(conf.log_level)
        .with_ansi(false)
        .with_target(false);
    let _ = match file {
        Some(f) => builder.with_writer(Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// Runs one CNI invocation: prints the result or the error object, returns the exit status.
pub fn run() -> i32 {
    let started = std::time::Instant::now();
    let invocation = match read_invocation() {
        Ok(i) => i,
        Err((version, e)) => {
            reply::print_raw(&reply::error_json(&version, &e));
            return 1;
        }
    };
    if invocation.command == Command::Version {
        reply::print_json(&reply::VersionReply {
            cni_version: invocation.cni_version.clone(),
            supported_versions: conf::SUPPORTED_VERSIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        });
        return 0;
    }
    let Some(conf) = invocation.conf else {
        return 1;
    };
    init_logging(&conf);
    let env = &invocation.env;
    let span = tracing::info_span!(
        "cni",
        command = ?invocation.command,
        container_id = env.container_id.as_deref().unwrap_or(""),
        ifname = env.ifname.as_deref().unwrap_or(""),
        netns = env.netns.as_deref().unwrap_or(""),
    );
    let _guard = span.enter();
    let mut kept = attach::Kept::default();
    let mut result = None;
    let outcome = match invocation.command {
        // In a chain after other plugins: their result goes on, with weft's after it.
        Command::Add => conf::prev_result(&conf).and_then(|prev| {
            attach::add(&conf, env, &mut kept).map(|r| {
                let r = r.for_version(&conf.cni_version);
                // Serialized as it is when weft comes first (the ADD's path), merged as JSON
                // only after other plugins.
                result = Some(match prev {
                    Some(prev) => serde_json::to_string(&r.after(prev)),
                    None => serde_json::to_string(&r),
                });
            })
        }),
        Command::Del => attach::del(&conf, env, &mut kept),
        Command::Check => attach::check(&conf, env),
        Command::Gc => gc::gc(&conf),
        Command::Status => gc::status(&conf),
        Command::Version => Ok(()),
    };
    if let Err(e) = &outcome {
        error!(code = e.code, msg = %e.msg, details = %e.details, "failed");
    }
    if matches!(invocation.command, Command::Add | Command::Del) {
        report(
            &conf,
            kept,
            invocation.command,
            outcome.is_ok(),
            started.elapsed(),
        );
    }
    // What the runtime reads comes last, just before the exit: its reader then finds the
    // output and the end of the stream together, rather than waking for the one and again for
    // the other while the report is sent (the runtime waits for the exit either way).
    match &outcome {
        Ok(()) => {
            if let Some(r) = result {
                reply::print_raw(&r.unwrap_or_else(|_| "{}".to_string()));
            }
            0
        }
        Err(e) => {
            reply::print_raw(&reply::error_json(&conf.cni_version, e));
            1
        }
    }
}

/// Tells the agent how an ADD or DEL went, for its metrics (best effort, before the result is
/// printed, without waiting for the agent's answer): on the connection the operation `kept`,
/// else on one of its own (an agent that is not there costs a failed connect).
fn report(
    conf: &conf::Conf,
    kept: attach::Kept,
    command: Command,
    ok: bool,
    took: std::time::Duration,
) {
    let req = weft_dataplane::proto::Request::Report {
        command: format!("{command:?}").to_ascii_uppercase(),
        ok,
        micros: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
    };
    // An older agent closes the connection after its answer: the report then goes on its own.
    if let Some(pending) = kept.0
        && pending.follow_with(&req).is_ok()
    {
        return;
    }
    if let Err(e) = weft_dataplane::proto::notify(
        &conf.agent_socket,
        &req,
        std::time::Duration::from_millis(200),
    ) {
        tracing::debug!(error = %error::chain(&e), "cannot report to the agent");
    }
}

/// Installs a panic hook that prints a spec-shaped error (weft code 100) instead of a bare panic.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let e = CniError::new(
            error::INTERNAL,
            "the weft plugin crashed (a bug: please report it)",
            info.to_string(),
        );
        reply::print_raw(&reply::error_json(conf::CURRENT_VERSION, &e));
    }));
}

/// Runs the environment and configuration parsers on arbitrary input (the fuzz target and its
/// corpus regression test use it). Returns the error code, or 0 when the input parsed.
pub fn fuzz_parse(cni_args: &str, stdin: &[u8]) -> u32 {
    let args = cni_args.to_string();
    let get = move |k: &str| match k {
        "CNI_ARGS" => Some(args.clone()),
        "CNI_CONTAINERID" => Some("fuzz".to_string()),
        "CNI_IFNAME" => Some("eth0".to_string()),
        "CNI_NETNS" => Some("/run/netns/fuzz".to_string()),
        _ => None,
    };
    let env = match conf::env_from(&get) {
        Ok(e) => e,
        Err(e) => return e.code,
    };
    match conf::parse_conf(stdin, &env) {
        Ok(c) => {
            if let Some(prev) = &c.prev_result {
                let _ = serde_json::from_value::<reply::CniResult>(prev.clone());
            }
            let _ = env.container_id();
            let _ = env.ifname();
            0
        }
        Err(e) => e.code,
    }
}
