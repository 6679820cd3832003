//! Commands replicated through the Raft log and their results, and the pure
//! decision of what a command does to the record store.
//!
//! Guarantees: [`decide`] reads only through the `lookup` it is given and has
//! no side effects, so the state machine can call it inside a (retryable) sled
//! transaction. A [`Command::Batch`] is checked completely before any of its
//! writes is returned: either every sub-command succeeds and all writes are
//! returned, or none is.
//!
//! Versions: a record is at version 1 when created and gains 1 per update. A
//! deleted record is gone; re-creating it starts again at version 1.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A write to the replicated record store, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create or update the record `(kind, name)`.
    ///
    /// `expected_version`: `Some(0)` means the record must not exist (create),
    /// `Some(v)` means it must currently be at version `v` (optimistic
    /// update), `None` means unconditional upsert.
    Put {
        /// Record type, e.g. `"volume"`.
        kind: String,
        /// Record name, unique within its kind.
        name: String,
        /// Encoded record (opaque to the store).
        data: Vec<u8>,
        /// Precondition on the current version, see above.
        expected_version: Option<u64>,
    },
    /// Delete the record `(kind, name)`.
    ///
    /// `expected_version`: `Some(v)` means it must currently be at version
    /// `v`; `None` deletes whatever version exists. A missing record gives
    /// [`CommandResult::NotFound`].
    Delete {
        /// Record type.
        kind: String,
        /// Record name.
        name: String,
        /// Precondition on the current version.
        expected_version: Option<u64>,
    },
    /// Sub-commands applied atomically: all are checked first, in order (each
    /// sees the effect of the previous ones), and applied only if all succeed.
    Batch(Vec<Command>),
}

/// Outcome of applying one log entry. A failed precondition is a normal
/// result, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The put or delete was applied. For a put, `version` is the new version;
    /// for a delete, the version the record had when it was deleted.
    Ok {
        /// See above.
        version: u64,
    },
    /// The version precondition failed; `current` is the record's current
    /// version (`None`: it does not exist). Nothing was written.
    Conflict {
        /// Current version of the record, if it exists.
        current: Option<u64>,
    },
    /// Delete of a record that does not exist. Nothing was written.
    NotFound,
    /// Every sub-command of a batch was applied; their results, in order.
    Batch(Vec<CommandResult>),
    /// The sub-command at `index` of a batch failed with `reason`; nothing of
    /// the batch was written.
    BatchRejected {
        /// Position of the failing sub-command.
        index: usize,
        /// Its (failed) result.
        reason: Box<CommandResult>,
    },
    /// Result of a log entry that carries no command (leader blank entry or
    /// membership change).
    Noop,
}

impl CommandResult {
    /// Whether the command took effect.
    pub fn is_applied(&self) -> bool {
        matches!(
            self,
            CommandResult::Ok { .. } | CommandResult::Batch(_) | CommandResult::Noop
        )
    }
}

/// One record as read from the applied state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Record type.
    pub kind: String,
    /// Record name.
    pub name: String,
    /// Current version (>= 1).
    pub version: u64,
    /// Encoded record.
    pub data: Vec<u8>,
}

/// A change to the record store decided by [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    Put {
        kind: String,
        name: String,
        version: u64,
        data: Vec<u8>,
    },
    Delete {
        kind: String,
        name: String,
    },
}

type Key = (String, String);

/// Current version of `(kind, name)`, `None` if the record does not exist.
pub(crate) type Lookup<'a, E> = dyn FnMut(&str, &str) -> Result<Option<u64>, E> + 'a;

/// Decide the result of `cmd` and the writes it makes, given `lookup(kind,
/// name)` returning the record's current version. Pure apart from `lookup`.
pub(crate) fn decide<E>(
    cmd: &Command,
    lookup: &mut Lookup<'_, E>,
) -> Result<(CommandResult, Vec<Write>), E> {
    let mut overlay: HashMap<Key, Option<u64>> = HashMap::new();
    decide_in(cmd, lookup, &mut overlay)
}

fn decide_in<E>(
    cmd: &Command,
    lookup: &mut Lookup<'_, E>,
    overlay: &mut HashMap<Key, Option<u64>>,
) -> Result<(CommandResult, Vec<Write>), E> {
    let mut current = |kind: &str, name: &str| -> Result<Option<u64>, E> {
        match overlay.get(&(kind.to_owned(), name.to_owned())) {
            Some(v) => Ok(*v),
            None => lookup(kind, name),
        }
    };
    match cmd {
        Command::Put {
            kind,
            name,
            data,
            expected_version,
        } => {
            let cur = current(kind, name)?;
            let ok = match expected_version {
                None => true,
                Some(0) => cur.is_none(),
                Some(v) => cur == Some(*v),
            };
            if !ok {
                return Ok((CommandResult::Conflict { current: cur }, vec![]));
            }
            let version = cur.map_or(1, |v| v.saturating_add(1));
            overlay.insert((kind.clone(), name.clone()), Some(version));
            Ok((
                CommandResult::Ok { version },
                vec![Write::Put {
                    kind: kind.clone(),
                    name: name.clone(),
                    version,
                    data: data.clone(),
                }],
            ))
        }
        Command::Delete {
            kind,
            name,
            expected_version,
        } => {
            let Some(cur) = current(kind, name)? else {
                return Ok((CommandResult::NotFound, vec![]));
            };
            if expected_version.is_some_and(|v| v != cur) {
                return Ok((CommandResult::Conflict { current: Some(cur) }, vec![]));
            }
            overlay.insert((kind.clone(), name.clone()), None);
            Ok((
                CommandResult::Ok { version: cur },
                vec![Write::Delete {
                    kind: kind.clone(),
                    name: name.clone(),
                }],
            ))
        }
        Command::Batch(cmds) => {
            // Sub-commands see each other's effects through a private overlay,
            // merged into the caller's only if the whole batch succeeds.
            let mut inner = overlay.clone();
            let mut results = Vec::with_capacity(cmds.len());
            let mut writes = Vec::new();
            for (index, sub) in cmds.iter().enumerate() {
                let (res, w) = decide_in(sub, lookup, &mut inner)?;
                if !res.is_applied() {
                    return Ok((
                        CommandResult::BatchRejected {
                            index,
                            reason: Box::new(res),
                        },
                        vec![],
                    ));
                }
                results.push(res);
                writes.extend(w);
            }
            *overlay = inner;
            Ok((CommandResult::Batch(results), writes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(name: &str, ev: Option<u64>) -> Command {
        Command::Put {
            kind: "volume".into(),
            name: name.into(),
            data: name.as_bytes().to_vec(),
            expected_version: ev,
        }
    }

    fn run(cmd: &Command, state: &[(&str, u64)]) -> (CommandResult, Vec<Write>) {
        let mut lookup = |_k: &str, n: &str| -> Result<Option<u64>, ()> {
            Ok(state.iter().find(|(s, _)| *s == n).map(|(_, v)| *v))
        };
        decide(cmd, &mut lookup).unwrap()
    }

    #[test]
    fn batch_sees_its_own_writes() {
        let cmd = Command::Batch(vec![put("a", Some(0)), put("a", Some(1))]);
        let (res, writes) = run(&cmd, &[]);
        assert_eq!(
            res,
            CommandResult::Batch(vec![
                CommandResult::Ok { version: 1 },
                CommandResult::Ok { version: 2 }
            ])
        );
        assert_eq!(writes.len(), 2);
    }

    #[test]
    fn nested_batch_rejection_writes_nothing() {
        let cmd = Command::Batch(vec![
            put("a", None),
            Command::Batch(vec![put("b", None), put("c", Some(3))]),
        ]);
        let (res, writes) = run(&cmd, &[]);
        assert!(matches!(res, CommandResult::BatchRejected { index: 1, .. }));
        assert!(writes.is_empty());
    }
}
