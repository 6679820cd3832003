//! The `Watch` RPC of one member, served from its own applied state (any
//! member can serve it, followers included) through its [`WatchHub`].
//!
//! Guarantees: a stream sends events in apply order with non-decreasing
//! revisions (the writes of one batch share a revision), without gaps: from
//! `from_revision` 0 it first sends every current record of the watched kinds
//! as a PUT at the member's current revision, then every later change; from
//! a revision r it replays the history's changes from r on, then the live
//! ones. It ends with `OUT_OF_RANGE` when r is older than the history, when
//! the watcher fell behind further than the history reaches, or when a
//! snapshot replaced the records: the client then Lists and watches again.
//! A watcher that falls behind less than that catches up from the history.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::v1::{EventType, Kind, WatchEvent, WatchRequest};
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tokio::sync::mpsc;
use tonic::Status;

use crate::server::{decode, kind_from};
use crate::watch::{Change, Msg, WatchHub};
use crate::StateMachineStore;

/// The stream a Watch answers.
pub(crate) type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

/// Events a stream may queue before it waits for its client.
const STREAM_BUFFER: usize = 64;

const ALL_KINDS: [Kind; 6] = [
    Kind::Node,
    Kind::Volume,
    Kind::Replica,
    Kind::Snapshot,
    Kind::BackupTarget,
    Kind::Backup,
];

/// Checks `req` and starts its stream.
#[allow(clippy::result_large_err)]
pub(crate) fn watch(sm: &StateMachineStore, req: &WatchRequest) -> Result<WatchStream, Status> {
    let mut kinds = BTreeSet::new();
    for k in &req.kinds {
        kinds.insert(kind_from(*k)?.cli_name());
    }
    if kinds.is_empty() {
        kinds = ALL_KINDS.iter().map(|k| k.cli_name()).collect();
    }
    let hub = sm.hub().clone();
    let (first, live, last_seq) = if req.from_revision == 0 {
        let (read, live, last) = hub.subscribe_with(|| current(sm, &kinds));
        (read?, live, last)
    } else {
        let (replay, live, last) = hub.subscribe_from(req.from_revision).map_err(|first| {
            Status::out_of_range(format!(
                "revision {} is older than the history this member keeps (from {first}); \
                 List again and watch from its revision + 1",
                req.from_revision
            ))
        })?;
        let events = replay
            .iter()
            .filter(|c| kinds.contains(c.record.kind.as_str()))
            .map(|c| event(c))
            .collect::<Result<Vec<_>, _>>()?;
        (events, live, last)
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(feed(hub, kinds, first, live, last_seq, tx));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// The current records of `kinds` as PUT events at the applied revision.
#[allow(clippy::result_large_err)]
fn current(
    sm: &StateMachineStore,
    kinds: &BTreeSet<&'static str>,
) -> Result<Vec<WatchEvent>, Status> {
    let internal = |e: crate::MetaError| Status::internal(e.to_string());
    let revision = sm.last_applied().map_err(internal)?.map_or(0, |l| l.index);
    let mut out = Vec::new();
    for kind in kinds {
        for r in sm.list(kind).map_err(internal)? {
            out.push(WatchEvent {
                r#type: EventType::Put.into(),
                record: Some(decode(&r)?),
                revision,
            });
        }
    }
    Ok(out)
}

#[allow(clippy::result_large_err)]
fn event(c: &Change) -> Result<WatchEvent, Status> {
    let t = if c.deleted {
        EventType::Delete
    } else {
        EventType::Put
    };
    Ok(WatchEvent {
        r#type: t.into(),
        record: Some(decode(&c.record)?),
        revision: c.revision,
    })
}

/// Sends `first`, then the changes after seq `last_seq` until the client
/// goes away or the stream has to end.
async fn feed(
    hub: Arc<WatchHub>,
    kinds: BTreeSet<&'static str>,
    first: Vec<WatchEvent>,
    mut live: Receiver<Msg>,
    mut last_seq: u64,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
) {
    for ev in first {
        if tx.send(Ok(ev)).await.is_err() {
            return;
        }
    }
    loop {
        let msg = tokio::select! {
            () = tx.closed() => return,
            m = live.recv() => m,
        };
        let changes = match msg {
            Ok(Msg::Change(c)) => vec![c],
            Ok(Msg::Reset) => {
                let s = Status::out_of_range(
                    "a snapshot replaced this member's records; List again and watch \
                     from its revision + 1",
                );
                let _ = tx.send(Err(s)).await;
                return;
            }
            Err(RecvError::Lagged(_)) => match hub.resume(last_seq) {
                Some((replay, again, _)) => {
                    live = again;
                    replay
                }
                None => {
                    let s = Status::out_of_range(
                        "this watcher fell behind the history; List again and watch from \
                         its revision + 1",
                    );
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            },
            Err(RecvError::Closed) => return,
        };
        for c in changes {
            if c.seq <= last_seq {
                continue;
            }
            last_seq = c.seq;
            if !kinds.contains(c.record.kind.as_str()) {
                continue;
            }
            let ev = event(&c);
            let failed = ev.is_err();
            if tx.send(ev).await.is_err() || failed {
                return;
            }
        }
    }
}
