//! The engines one node runs, by volume name, shared with the control endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use cairn_engine::Engine;

/// Engines by volume name; they come and go while the node runs.
#[derive(Default)]
pub struct Engines {
    map: RwLock<BTreeMap<String, Arc<Engine>>>,
    managed: bool,
}

impl Engines {
    /// A registry whose replica membership the metadata service owns (an agent's): the
    /// control endpoint refuses to add or remove replicas by hand.
    pub fn managed() -> Engines {
        Engines {
            managed: true,
            ..Engines::default()
        }
    }

    /// Whether replica membership belongs to the metadata service.
    pub fn is_managed(&self) -> bool {
        self.managed
    }

    pub fn insert(&self, volume: &str, engine: Arc<Engine>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert(volume.to_owned(), engine);
    }

    pub fn remove(&self, volume: &str) -> Option<Arc<Engine>> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.remove(volume)
    }

    pub fn get(&self, volume: &str) -> Option<Arc<Engine>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(volume).cloned()
    }

    /// Volume names, sorted.
    pub fn names(&self) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }
}
