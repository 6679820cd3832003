//! `cairn member ...`: the members of the metadata service (its Raft group), through
//! `--meta`.
//!
//! Usage:
//!
//! ```text
//! cairn member list [--json] [--meta ADDR]
//! cairn member add --id N --address HOST:PORT [--meta ADDR]
//! cairn member remove --id N [--meta ADDR]
//! ```
//!
//! - `list` prints every member: id, address, `voter` or `learner`, and which one is the
//!   leader (from `Members` and `Leader` of the member at `--meta`). `--json` prints an array
//!   of `{"id", "address", "role", "leader"}` objects sorted by id.
//! - `add` grows the group: start `cairn meta --id N --listen HOST:PORT --data-dir DIR`
//!   (no `--init`) first, then `cairn member add --id N --address HOST:PORT`. Meta adds it as
//!   a learner, waits for it to catch up, makes it a voter, and the command prints the new
//!   member list.
//! - `remove` takes a member out of the group (voter or learner) and prints the new member
//!   list; the removed process can then be stopped and its data dir discarded. Ids are never
//!   reused.
//!
//! Guarantees: an id of 0 or an address that is not `HOST:PORT` is refused before any RPC.
//! Errors the user can act on exit 1 with one `error:` line: an unknown member on `remove`
//! (NOT_FOUND), removing the last member (FAILED_PRECONDITION), a refused change. A meta that
//! cannot be reached is exit 2.
//!
//! Assumes: any member serves these calls (members forward `AddMember` and `RemoveMember` to
//! the leader). `add` may take as long as the new member needs to catch up, so it gets a
//! longer deadline ([`ADD_TIMEOUT`]) than the other calls; if it runs out, meta may still
//! finish the change, which `list` shows.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    AddMemberRequest, LeaderRequest, LeaderResponse, Member, MembersRequest, RemoveMemberRequest,
};
use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;

use crate::records::{self, block_on, print_json, run_cli, status_error, user_error, MetaAddr};

/// How long `add` waits for meta to add the member and have it catch up.
const ADD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List the members: id, address, voter or learner, and which one is the leader.
    List {
        /// Print the members as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Add a member (already running `cairn meta` without `--init`): it joins as a learner,
    /// catches up, then becomes a voter. Prints the new member list.
    Add {
        /// Raft id of the new member: positive, unique, never reused.
        #[arg(long)]
        id: u64,
        /// `host:port` the new member serves gRPC on (its `--listen`).
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Remove a member from the group. Refused (exit 1) for an unknown id and for the last
    /// member. Prints the new member list.
    Remove {
        /// Raft id of the member to remove.
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        meta: MetaAddr,
    },
}

/// One member as `list --json` prints it.
#[derive(Debug, Serialize)]
struct MemberJson {
    /// Raft id.
    id: u64,
    /// `host:port` of its gRPC server.
    address: String,
    /// `voter` or `learner` (catching up).
    role: &'static str,
    /// True for the current leader.
    leader: bool,
}

fn to_json(members: &[Member], leader: Option<u64>) -> Vec<MemberJson> {
    let mut out: Vec<MemberJson> = members
        .iter()
        .map(|m| MemberJson {
            id: m.id,
            address: m.address.clone(),
            role: if m.voter { "voter" } else { "learner" },
            leader: leader == Some(m.id),
        })
        .collect();
    out.sort_by_key(|m| m.id);
    out
}

fn print_table(members: &[MemberJson]) {
    println!("{:>6} {:<28} {:<8} leader", "id", "address", "role");
    for m in members {
        println!(
            "{:>6} {:<28} {:<8} {}",
            m.id,
            m.address,
            m.role,
            if m.leader { "*" } else { "" }
        );
    }
}

/// Refuses an id of 0 before any RPC.
fn check_id(id: u64) -> anyhow::Result<()> {
    if id == 0 {
        return Err(user_error("--id must be a positive integer, not 0"));
    }
    Ok(())
}

/// Refuses an address that is not `HOST:PORT` before any RPC.
fn check_address(address: &str) -> anyhow::Result<()> {
    if address.trim().is_empty() {
        return Err(user_error("--address is empty; expected HOST:PORT"));
    }
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(user_error(format!(
            "--address {address:?}: expected HOST:PORT"
        )));
    }
    Ok(())
}

/// A client whose calls may run for `timeout` (the shared one stops after a few seconds).
fn client_with_timeout(addr: &str, timeout: Duration) -> anyhow::Result<MetaClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad --meta address {addr:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .connect_lazy();
    Ok(MetaClient::new(ch))
}

/// The leader the member at `addr` knows of, if any.
async fn leader(addr: &str) -> anyhow::Result<Option<u64>> {
    let LeaderResponse { known, id, .. } = records::client(addr)?
        .leader(LeaderRequest {})
        .await
        .map_err(|s| status_error(addr, &s))?
        .into_inner();
    Ok(known.then_some(id))
}

/// Members and leader as the member at `addr` sees them.
async fn list(addr: &str) -> anyhow::Result<Vec<MemberJson>> {
    let members = records::client(addr)?
        .members(MembersRequest {})
        .await
        .map_err(|s| status_error(addr, &s))?
        .into_inner()
        .members;
    Ok(to_json(&members, leader(addr).await?))
}

/// Prints `members` after a change, with the leader as the member at `addr` now sees it.
async fn print_after_change(addr: &str, members: &[Member]) -> anyhow::Result<()> {
    // The change is done; a leader unknown for a moment (e.g. the old leader removed
    // itself) is not an error of the change.
    let leader = leader(addr).await.ok().flatten();
    print_table(&to_json(members, leader));
    Ok(())
}

/// Runs `cairn member ...`.
pub fn run(cmd: MemberCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MemberCommand::List { json, meta } => run_cli(|| {
            let members = block_on(list(&meta.addr))??;
            if json {
                print_json(&members)?;
            } else {
                print_table(&members);
            }
            Ok(ExitCode::SUCCESS)
        }),
        MemberCommand::Add { id, address, meta } => run_cli(|| {
            check_id(id)?;
            check_address(&address)?;
            let addr = meta.addr.as_str();
            block_on(async {
                let members = client_with_timeout(addr, ADD_TIMEOUT)?
                    .add_member(AddMemberRequest {
                        id,
                        address: address.clone(),
                    })
                    .await
                    .map_err(|s| status_error(addr, &s))?
                    .into_inner()
                    .members;
                print_after_change(addr, &members).await
            })??;
            Ok(ExitCode::SUCCESS)
        }),
        MemberCommand::Remove { id, meta } => run_cli(|| {
            check_id(id)?;
            let addr = meta.addr.as_str();
            block_on(async {
                let members = records::client(addr)?
                    .remove_member(RemoveMemberRequest { id })
                    .await
                    .map_err(|s| match s.code() {
                        tonic::Code::NotFound => user_error(format!("no member {id}")),
                        tonic::Code::FailedPrecondition => {
                            user_error(format!("member {id}: {}", s.message()))
                        }
                        _ => status_error(addr, &s),
                    })?
                    .into_inner()
                    .members;
                print_after_change(addr, &members).await
            })??;
            Ok(ExitCode::SUCCESS)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(check_address("127.0.0.1:7400").is_ok());
        assert!(check_address("meta-2.cairn:7400").is_ok());
        for bad in [
            "",
            "  ",
            "127.0.0.1",
            ":7400",
            "host:",
            "host:0",
            "host:99999",
        ] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
        assert!(check_id(0).is_err());
        assert!(check_id(1).is_ok());
    }

    #[test]
    fn json_is_sorted_and_marks_the_leader() {
        let m = |id, voter| Member {
            id,
            address: format!("h:{id}"),
            voter,
        };
        let j = to_json(&[m(3, false), m(1, true)], Some(1));
        assert_eq!(j[0].id, 1);
        assert!(j[0].leader);
        assert_eq!(j[0].role, "voter");
        assert_eq!(j[1].role, "learner");
        assert!(!j[1].leader);
    }
}
