//! The smoltcp device that sits on the WireGuard core: inbound packets come from a bounded
//! queue filled by the driver, outbound packets are encrypted and sent the moment smoltcp
//! emits them (no queue, no copy beyond the one into the ciphertext buffer).

use std::collections::VecDeque;
use std::io;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::tunnel::udp::UdpEndpoint;
use crate::tunnel::{Output, WgCore};

/// Inner packets waiting for smoltcp. Bounded: beyond this the driver drops (TCP retransmits).
pub(crate) const RX_QUEUE_MAX: usize = 4096;

/// Counters of the device, for status and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceCounters {
    pub rx_queue_drops: u64,
    pub udp_send_errors: u64,
}

pub(crate) struct TunnelDevice<'a> {
    pub(crate) rx: &'a mut VecDeque<Vec<u8>>,
    pub(crate) core: &'a mut WgCore,
    pub(crate) udp: &'a UdpEndpoint,
    pub(crate) scratch: &'a mut Vec<u8>,
    pub(crate) mtu: usize,
    pub(crate) counters: &'a mut DeviceCounters,
}

pub(crate) fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    // Every inner packet is authenticated by WireGuard's AEAD (ChaCha20-Poly1305), which is far
    // stronger than the Internet checksum, so verifying IP/TCP checksums on receive is wasted
    // work. They are still computed on transmit for the peer's kernel.
    let mut cs = ChecksumCapabilities::default();
    cs.ipv4 = Checksum::Tx;
    cs.tcp = Checksum::Tx;
    cs.udp = Checksum::Tx;
    cs.icmpv4 = Checksum::Tx;
    cs.icmpv6 = Checksum::Tx;
    caps.checksum = cs;
    caps
}

impl phy::Device for TunnelDevice<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken(packet),
            TxToken {
                core: self.core,
                udp: self.udp,
                scratch: self.scratch,
                counters: self.counters,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            core: self.core,
            udp: self.udp,
            scratch: self.scratch,
            counters: self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

pub(crate) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

pub(crate) struct TxToken<'a> {
    core: &'a mut WgCore,
    udp: &'a UdpEndpoint,
    scratch: &'a mut Vec<u8>,
    counters: &'a mut DeviceCounters,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        let packet = &mut self.scratch[..len];
        let r = f(packet);
        let udp = self.udp;
        let counters = &mut *self.counters;
        // A packet with no route or no endpoint is dropped here; dial() reports those cases
        // before a connection starts, and TCP retransmits anything lost in between.
        let _ = self.core.send_ip(packet, &mut |o| {
            if let Output::Udp { to, from, data } = o {
                if let Err(e) = udp.try_send(data, to, from) {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::debug!(%to, error = %e, "WireGuard UDP send failed");
                    }
                    counters.udp_send_errors += 1;
                }
            }
        });
        r
    }
}
