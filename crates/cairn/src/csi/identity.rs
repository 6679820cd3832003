//! The CSI Identity service: who the plugin is, what it offers, whether it is ready.

use std::time::Duration;

use cairn_csi::pb;
use cairn_csi::pb::identity_server::Identity;
use tonic::{Request, Response, Status};

use crate::records;

pub struct IdentityService {
    pub driver_name: String,
    pub meta: String,
    /// Whether this process serves the Controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let service = |t: service::Type| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![service(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.insert(0, service(service::Type::ControllerService));
        }
        capabilities.push(pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        });
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Ready while meta answers: every Controller call and a node's volume conditions need it.
    async fn probe(
        &self,
        _req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = meta_reachable(&self.meta).await;
        if let Err(e) = &ready {
            tracing::warn!(meta = self.meta, error = %e, "probe: meta is not reachable");
        }
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(ready.is_ok()),
        }))
    }
}

/// Asks meta who leads, within 3 s.
pub async fn meta_reachable(meta: &str) -> Result<(), String> {
    let mut client = records::client(meta).map_err(|e| format!("{e:#}"))?;
    let call = client.leader(cairn_proto::v1::LeaderRequest {});
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(format!("meta at {meta}: {}", s.message())),
        Err(_) => Err(format!("meta at {meta} did not answer within 3 s")),
    }
}
