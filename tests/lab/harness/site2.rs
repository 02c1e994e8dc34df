//! A second corp site in a lab (`scripts/lab.sh site2`): its own router namespace with a WAN
//! link to the edge, its own wireguard-go peer (from the exact `peer add` text) and its own LAN
//! with one model host, for replicas of a model at two sites.
//!
//! ```text
//! [edge]   198.51.101.1 ── 198.51.101.2 [corp2]  wireguard-go (peer `corp2`), corp router rules
//!                                       10.30.0.1
//!                                           │
//!                                       10.30.0.5 [model2]
//! ```
//!
//! Removed with the lab (`lab.sh down` deletes its namespaces and socket).

use super::lab::{Appliance, Lab};
use super::proc::Proc;

pub const MODEL2_ADDR: &str = "10.30.0.5";
pub const LAN2_NET: &str = "10.30.0.0/24";

/// The second site's namespaces and its running corp peer.
pub struct Site2 {
    pub corp: String,
    pub model: String,
    pub wg: String,
    /// wireguard-go of the site; stopped by PID on drop (held, never read).
    _peer: Proc,
}

impl Site2 {
    /// Adds the site to `lab`, `peer add corp2 --allowed-ips 10.30.0.0/24` to `app`, and starts
    /// the site's wireguard-go from the printed file (it dials the appliance). Call before the
    /// daemon starts, or reload it afterwards.
    pub fn up(lab: &Lab, app: &Appliance) -> Site2 {
        lab.sh(&["site2", &lab.tag]);
        let conf = app.cli(&["peer", "add", "corp2", "--allowed-ips", LAN2_NET]);
        assert!(conf.contains("[Peer]"), "peer add corp2 printed:\n{conf}");
        let (corp, model, wg) = (
            format!("mg-{}-corp2", lab.tag),
            format!("mg-{}-model2", lab.tag),
            format!("mg{}d", lab.tag),
        );
        let peer = lab.start_wg(&corp, &wg, &conf);
        Site2 {
            corp,
            model,
            wg,
            _peer: peer,
        }
    }

    /// Waits (bounded: 10 s) for the site's first handshake with the appliance.
    pub fn assert_handshake(&self, lab: &Lab) {
        assert!(
            lab.wait_handshake(&self.corp, &self.wg, 0, std::time::Duration::from_secs(10)),
            "corp2 wireguard-go did not complete a handshake with modelgate within 10 s"
        );
    }
}
