//! The control API of Cairn (`cairn.v1`, see `proto/cairn/v1/meta.proto`): the
//! prost messages and tonic clients and servers generated from it, plus the
//! checks and conversions every user of the protos needs.
//!
//! Guarantees: [`validate_record`] accepts exactly the records meta may store
//! (names, references, sizes); the lowercase names of [`cli`] round-trip
//! through `FromStr`. Assumes nothing about transport or storage: no I/O here.

// The generated code trips no lint the workspace turns on today; these are the
// groups it trips when turned on (measured with `-W clippy::pedantic -W
// missing_docs`: `default_trait_access`, `must_use_candidate`,
// `too_many_lines`, `missing_errors_doc`, `doc_markdown` and missing docs).
/// Code generated from `proto/cairn/v1/*.proto` by `tonic-build`.
#[allow(clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cairn.v1");
}

pub mod cli;
mod record;
mod validate;

pub use record::{key_of, kind_of, name_of, validate_record, version_of, with_version};
pub use validate::{
    validate_name, validate_node_name, validate_stale_replica_timeout, validate_volume_size,
    ValidationError, MAX_NAME_LEN, MAX_NODE_NAME_LEN, MAX_STALE_REPLICA_TIMEOUT_SECS,
    MAX_VOLUME_SIZE, VOLUME_SIZE_ALIGN,
};

#[cfg(test)]
mod tests {
    use super::v1;

    /// The build generates both sides of both services.
    #[test]
    fn servers_and_clients_are_generated() {
        fn meta<T: v1::meta_server::Meta>(t: T) -> v1::meta_server::MetaServer<T> {
            v1::meta_server::MetaServer::new(t)
        }
        fn raft<T: v1::raft_server::Raft>(t: T) -> v1::raft_server::RaftServer<T> {
            v1::raft_server::RaftServer::new(t)
        }
        let _ = (meta::<NoMeta>, raft::<NoRaft>);
        assert_eq!(
            <v1::meta_server::MetaServer<NoMeta> as tonic::server::NamedService>::NAME,
            "cairn.v1.Meta"
        );
        assert_eq!(
            <v1::raft_server::RaftServer<NoRaft> as tonic::server::NamedService>::NAME,
            "cairn.v1.Raft"
        );
        let _ = std::any::type_name::<v1::meta_client::MetaClient<tonic::transport::Channel>>();
        let _ = std::any::type_name::<v1::raft_client::RaftClient<tonic::transport::Channel>>();
    }

    struct NoMeta;
    struct NoRaft;

    type R<T> = Result<tonic::Response<T>, tonic::Status>;
    // tonic's service traits fix the error type to `tonic::Status`.
    #[allow(clippy::result_large_err)]
    fn no<T>() -> R<T> {
        Err(tonic::Status::unimplemented("test"))
    }

    #[tonic::async_trait]
    impl v1::raft_server::Raft for NoRaft {
        async fn append_entries(&self, _: tonic::Request<v1::RaftRequest>) -> R<v1::RaftReply> {
            no()
        }
        async fn vote(&self, _: tonic::Request<v1::RaftRequest>) -> R<v1::RaftReply> {
            no()
        }
        async fn install_snapshot(&self, _: tonic::Request<v1::RaftRequest>) -> R<v1::RaftReply> {
            no()
        }
    }

    #[tonic::async_trait]
    impl v1::meta_server::Meta for NoMeta {
        type WatchStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<v1::WatchEvent, tonic::Status>> + Send>,
        >;
        async fn create(&self, _: tonic::Request<v1::CreateRequest>) -> R<v1::CreateResponse> {
            no()
        }
        async fn get(&self, _: tonic::Request<v1::GetRequest>) -> R<v1::GetResponse> {
            no()
        }
        async fn list(&self, _: tonic::Request<v1::ListRequest>) -> R<v1::ListResponse> {
            no()
        }
        async fn update(&self, _: tonic::Request<v1::UpdateRequest>) -> R<v1::UpdateResponse> {
            no()
        }
        async fn delete(&self, _: tonic::Request<v1::DeleteRequest>) -> R<v1::DeleteResponse> {
            no()
        }
        async fn watch(&self, _: tonic::Request<v1::WatchRequest>) -> R<Self::WatchStream> {
            no()
        }
        async fn add_member(
            &self,
            _: tonic::Request<v1::AddMemberRequest>,
        ) -> R<v1::MembersResponse> {
            no()
        }
        async fn remove_member(
            &self,
            _: tonic::Request<v1::RemoveMemberRequest>,
        ) -> R<v1::MembersResponse> {
            no()
        }
        async fn members(&self, _: tonic::Request<v1::MembersRequest>) -> R<v1::MembersResponse> {
            no()
        }
        async fn leader(&self, _: tonic::Request<v1::LeaderRequest>) -> R<v1::LeaderResponse> {
            no()
        }
        async fn heartbeat(
            &self,
            _: tonic::Request<v1::HeartbeatRequest>,
        ) -> R<v1::HeartbeatResponse> {
            no()
        }
    }
}
