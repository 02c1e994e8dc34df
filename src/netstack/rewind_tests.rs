//! The one change in the vendored smoltcp (vendor/README.md): a TCP receive ring that empties
//! rewinds to its start. Checked through smoltcp's own loopback device: messages smaller than
//! the ring, each read before the next arrives, always arrive in one contiguous slice. Without
//! the change the write position walks round the ring and the message that crosses its end
//! comes out in two pieces (and, in the daemon, every page of the ring ends up resident).

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

const RING: usize = 4096;
const MESSAGE: usize = 1000;

struct Lab {
    dev: Loopback,
    iface: Interface,
    set: SocketSet<'static>,
    now: Instant,
}

impl Lab {
    fn new() -> Lab {
        let mut dev = Loopback::new(Medium::Ip);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8))
                .expect("one address fits")
        });
        Lab {
            dev,
            iface,
            set: SocketSet::new(vec![]),
            now: Instant::ZERO,
        }
    }

    fn socket(&mut self) -> SocketHandle {
        self.set.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RING]),
            tcp::SocketBuffer::new(vec![0; RING]),
        ))
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.set.get_mut::<tcp::Socket>(h)
    }

    /// Polls (at most 100 rounds, 1 ms of smoltcp time each) until `done` holds.
    fn poll_until(&mut self, mut done: impl FnMut(&mut Lab) -> bool) -> bool {
        for _ in 0..100 {
            self.iface.poll(self.now, &mut self.dev, &mut self.set);
            if done(self) {
                return true;
            }
            self.now += Duration::from_millis(1);
        }
        false
    }
}

#[test]
fn an_emptied_receive_ring_rewinds_so_each_message_arrives_contiguous() {
    let mut lab = Lab::new();
    let server = lab.socket();
    let client = lab.socket();
    lab.tcp(server).listen(1234).expect("listen");
    let cx = lab.iface.context();
    lab.set
        .get_mut::<tcp::Socket>(client)
        .connect(cx, (IpAddress::v4(127, 0, 0, 1), 1234), 50_000)
        .expect("connect");
    assert!(
        lab.poll_until(|l| l.tcp(server).may_recv() && l.tcp(client).may_send()),
        "the loopback connection never became established"
    );
    // Five rings' worth, one message at a time, each read whole before the next is sent.
    for i in 0..(5 * RING / MESSAGE) {
        let fill = i as u8;
        let sent = lab.tcp(client).send_slice(&[fill; MESSAGE]).expect("send");
        assert_eq!(sent, MESSAGE, "message {i}: the send ring had room");
        assert!(
            lab.poll_until(|l| l.tcp(server).recv_queue() == MESSAGE),
            "message {i} never arrived whole"
        );
        let got = lab
            .tcp(server)
            .recv(|b| (b.len(), b.to_vec()))
            .expect("recv");
        assert_eq!(
            got.len(),
            MESSAGE,
            "message {i} came out of the receive ring in pieces: it did not rewind when empty"
        );
        assert!(got.iter().all(|&b| b == fill), "message {i} was corrupted");
        assert_eq!(lab.tcp(server).recv_queue(), 0);
    }
}
