//! `ctl flows` and `ctl sessions`, daemon side: which services a dump may name, the kernel's
//! flow table read off the async runtime, and the proxy's sessions gathered from every worker
//! (each answers for the sessions it runs: `sessions`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::Dataplane;
use crate::control::{DEFAULT_FLOW_LIMIT, Reply, SessionsReport};
use crate::sessions::Ask;
use crate::state::Snapshot;
use crate::xdp::FlowReader;

/// How long a worker may take to list its sessions (it answers between two polls of its
/// sessions, so only a thread stuck elsewhere comes near it).
const WORKER_ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// The service `name` must be, if one is named, for a dump of `dataplane`: its kernel index
/// (xdp) or nothing; a refusal naming the services there are.
fn service_of(
    snapshot: &Snapshot,
    name: Option<&str>,
    dataplane: Dataplane,
    other_command: &str,
) -> Result<Option<u32>, String> {
    let Some(name) = name else {
        return Ok(None);
    };
    let service = snapshot.named(name)?;
    if service.config.dataplane != dataplane {
        return Err(format!(
            "service {name:?} runs on the {} data plane: see `ctl {other_command}`",
            service.config.dataplane
        ));
    }
    Ok(Some(service.kernel_index))
}

/// `ctl flows`: the least idle flows of the kernel's tables.
pub async fn flows(
    snapshot: Arc<Snapshot>,
    reader: Option<Arc<FlowReader>>,
    service: Option<String>,
    limit: Option<u32>,
) -> Reply {
    let index = match service_of(&snapshot, service.as_deref(), Dataplane::Xdp, "sessions") {
        Ok(index) => index,
        Err(refused) => return Reply::refused(refused),
    };
    let Some(reader) = reader else {
        return Reply::refused(
            "no xdp service runs: the kernel flow table exists only with dataplane = \"xdp\" (proxy sessions: `ctl sessions`)",
        );
    };
    let limit = limit.unwrap_or(DEFAULT_FLOW_LIMIT);
    if limit == 0 {
        return Reply::refused("--limit 0: list at least one flow");
    }
    // Map reads are system calls, a large table many of them: not on the control runtime.
    let read = tokio::task::spawn_blocking(move || reader.dump(&snapshot, index, limit as usize));
    match read.await {
        Ok(report) => Reply {
            flows: Some(report),
            ..Reply::ok("")
        },
        Err(error) => Reply::refused(format!("reading the flow tables failed: {error}")),
    }
}

/// `ctl sessions`: every worker's open sessions (of `service`, if named), oldest first.
pub async fn sessions(
    snapshot: Arc<Snapshot>,
    workers: &[mpsc::UnboundedSender<Ask>],
    service: Option<String>,
) -> Reply {
    if let Err(refused) = service_of(&snapshot, service.as_deref(), Dataplane::Proxy, "flows") {
        return Reply::refused(refused);
    }
    let mut answers = Vec::with_capacity(workers.len());
    for worker in workers {
        let (ask, answer) = oneshot::channel();
        if worker.send(ask).is_ok() {
            answers.push(answer);
        }
    }
    let mut sessions = Vec::new();
    for answer in answers {
        match tokio::time::timeout(WORKER_ANSWER_LIMIT, answer).await {
            Ok(Ok(mut listed)) => sessions.append(&mut listed),
            Ok(Err(_)) => {} // the worker has ended (shutdown)
            Err(_) => {
                return Reply::refused(format!(
                    "a worker thread did not list its sessions within {}s",
                    WORKER_ANSWER_LIMIT.as_secs()
                ));
            }
        }
    }
    if let Some(name) = &service {
        sessions.retain(|s| &s.service == name);
    }
    sessions.sort_by_key(|s| std::cmp::Reverse(s.age_ms));
    Reply {
        sessions: Some(SessionsReport { sessions }),
        ..Reply::ok("")
    }
}
