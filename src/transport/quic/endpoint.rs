//! The UDP socket and quinn settings of a rank's endpoints.

use crate::config::Config;
use crate::{Error, Result};
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;

/// Bind one UDP socket with the configured buffer sizes and wrap it in a
/// quinn endpoint (client-capable; the server side is enabled once the rank
/// has its certificate).
pub fn bind(addr: SocketAddr, cfg: &Config) -> Result<quinn::Endpoint> {
    bind_on(addr, cfg, Arc::new(quinn::TokioRuntime))
}

/// [`bind`], with the endpoint's tasks (its driver, its connections'
/// drivers) spawned by `runtime`.
pub(super) fn bind_on(
    addr: SocketAddr,
    cfg: &Config,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint> {
    let std_sock = socket(addr, cfg)?;
    // quinn caps the UDP payload it accepts (and so the path MTU it can
    // discover) at 1472 bytes unless told otherwise; raise the cap to the
    // configured MTU upper bound so that discovery can reach it.
    let mut ep_cfg = quinn::EndpointConfig::default();
    ep_cfg
        .max_udp_payload_size(cfg.mtu_upper_bound())
        .map_err(|e| Error::config(format!("MTU upper bound: {e}")))?;
    let fail = |e: std::io::Error| {
        Error::transport(
            None,
            format!("cannot start endpoint on UDP socket on {addr}: {e}"),
        )
    };
    let sock = wrap(&*runtime, std_sock).map_err(fail)?;
    quinn::Endpoint::new_with_abstract_socket(ep_cfg, None, sock, runtime).map_err(fail)
}

/// A UDP socket bound to `addr`, with the configured buffer sizes, for
/// [`bind`] or [`rebind`].
fn socket(addr: SocketAddr, cfg: &Config) -> Result<std::net::UdpSocket> {
    let io = |what: &str, e: std::io::Error| {
        Error::transport(None, format!("cannot {what} UDP socket on {addr}: {e}"))
    };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| io("create", e))?;
    // The kernel clamps to net.core.{r,w}mem_max; a smaller buffer only costs speed.
    let _ = sock.set_recv_buffer_size(cfg.socket_buffer_bytes());
    let _ = sock.set_send_buffer_size(cfg.socket_buffer_bytes());
    sock.set_nonblocking(true).map_err(|e| io("configure", e))?;
    sock.bind(&addr.into()).map_err(|e| io("bind", e))?;
    Ok(sock.into())
}

/// Move `endpoint` to a fresh UDP socket on `addr`, set up as [`bind`]
/// sets up the first.
pub fn rebind(endpoint: &quinn::Endpoint, addr: SocketAddr, cfg: &Config) -> Result<()> {
    let io = |e: std::io::Error| {
        Error::transport(
            None,
            format!("cannot move the endpoint to a new UDP socket: {e}"),
        )
    };
    let sock = wrap(&quinn::TokioRuntime, socket(addr, cfg)?).map_err(io)?;
    endpoint.rebind_abstract(sock).map_err(io)
}

/// `sock` as the runtime's quinn socket, sending segmentation-offload
/// batches in parts the kernel accepts (see [`Batches`]).
fn wrap(
    runtime: &dyn quinn::Runtime,
    sock: std::net::UdpSocket,
) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    Ok(Batches::wrap(runtime.wrap_udp_socket(sock)?))
}

/// quinn transport settings for rank-to-rank connections.
pub fn transport_config(cfg: &Config) -> Result<Arc<TransportConfig>> {
    let mut t = liveness(cfg)?;
    t.stream_receive_window(VarInt::from_u32(cfg.stream_receive_window()));
    t.send_window(cfg.send_window());
    t.max_concurrent_uni_streams(VarInt::from_u32(cfg.max_streams()));
    t.max_concurrent_bidi_streams(VarInt::from_u32(8));
    // Ranks send no datagrams; without this quinn lets a peer fill 1.25 MB
    // of datagram buffer per connection.
    t.datagram_receive_buffer_size(None);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.mtu_upper_bound());
    t.mtu_discovery_config(Some(mtu));
    t.enable_segmentation_offload(true);
    // Ten full-size packets in the first window, as TCP starts with ten
    // segments of its MSS. quinn's default (12,000 bytes, ten of QUIC's
    // minimum 1,200-byte packets) holds one jumbo packet: with
    // discovery probes in flight, a new connection's last small message
    // (a rank's Bye) could wait seconds to be sent.
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(initial_window(cfg));
    t.congestion_controller_factory(Arc::new(cubic));
    Ok(Arc::new(t))
}

/// The congestion window a connection starts with: ten packets of the
/// largest size path-MTU discovery may reach, and never below RFC 9002's
/// 14,720 bytes.
fn initial_window(cfg: &Config) -> u64 {
    (10 * u64::from(cfg.mtu_upper_bound())).max(14_720)
}

/// Receive window (per stream and per connection) of the seed's side of a
/// joiner's connection: room for the largest join request the seed reads
/// (16 KiB) and its prefix; what a rank sends after it is tiny.
const SEED_WINDOW: u32 = 20 << 10;

/// quinn transport settings for the seed's side of joiners' connections.
/// Anyone who reaches the seed can open one, before proving anything, so it
/// must cost the seed little: no unidirectional streams (the join exchange
/// and everything after it use one bidirectional stream), one
/// bidirectional stream, and small receive windows (quinn buffers what
/// arrives up to the window even when nobody reads it).
pub fn seed_transport_config(cfg: &Config) -> Result<Arc<TransportConfig>> {
    let mut t = liveness(cfg)?;
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.stream_receive_window(VarInt::from_u32(SEED_WINDOW));
    t.receive_window(VarInt::from_u32(SEED_WINDOW));
    // Nothing in the join protocol uses datagrams; quinn would otherwise
    // buffer up to 1.25 MB of them per connection.
    t.datagram_receive_buffer_size(None);
    t.send_window(cfg.send_window());
    Ok(Arc::new(t))
}

/// Default quinn settings with the configured idle timeout and keep-alive,
/// shared by ranks' and the seed's connections.
fn liveness(cfg: &Config) -> Result<TransportConfig> {
    let mut t = TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout())
        .map_err(|_| Error::config("idle timeout is too large for QUIC"))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(cfg.keep_alive()));
    Ok(t)
}

/// What one `sendmsg` with UDP segmentation offload may carry: the kernel
/// refuses a batch whose datagrams add up to more than an IP packet's 64 KiB
/// (less the headers), and quinn-udp drops a refused batch without a word
/// (it takes EMSGSIZE for a failed MTU probe). Kept under that with room
/// for IPv6 and UDP headers.
const GSO_BATCH_BYTES: usize = 65_000;

/// A rank's UDP socket as quinn sees it, keeping batches of offloaded
/// datagrams within [`GSO_BATCH_BYTES`]. quinn batches up to 10 datagrams:
/// at an MTU above about 6,500 bytes (jumbo frames, loopback) whole batches
/// were lost and the path fell back to 1,200-byte packets. Once it has seen
/// datagrams of a size, the socket asks quinn for batches of as many as fit
/// (7 at 8,952 bytes, quinn's 10 at 1,452); a batch that still does not fit
/// (the first at a new size) goes out in parts.
#[derive(Debug)]
struct Batches {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// The largest datagram of an offloaded batch sent so far.
    largest: std::sync::atomic::AtomicUsize,
}

impl Batches {
    fn wrap(inner: Arc<dyn quinn::AsyncUdpSocket>) -> Arc<dyn quinn::AsyncUdpSocket> {
        Arc::new(Batches {
            inner,
            largest: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

impl quinn::AsyncUdpSocket for Batches {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        let seg = match transmit.segment_size {
            Some(seg) if seg > 0 => seg,
            _ => return self.inner.try_send(transmit),
        };
        self.largest
            .fetch_max(seg, std::sync::atomic::Ordering::Relaxed);
        if transmit.contents.len() <= GSO_BATCH_BYTES {
            return self.inner.try_send(transmit);
        }
        // Whole datagrams per send. If a later part would block, quinn
        // sends the whole batch again later: the parts already sent arrive
        // twice, and the receiver drops the copies (same packet numbers).
        let per = (GSO_BATCH_BYTES / seg).max(1) * seg;
        for part in transmit.contents.chunks(per) {
            self.inner.try_send(&quinn::udp::Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // The inner socket's own limit may drop to 1 at run time (a device
        // without segmentation offload): it is asked every time.
        let inner = self.inner.max_transmit_segments();
        match self.largest.load(std::sync::atomic::Ordering::Relaxed) {
            0 => inner,
            seg => inner.min((GSO_BATCH_BYTES / seg).max(1)),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Credentials, JobCa, RankKey};
    use std::time::Duration;

    fn creds(ca: &JobCa, rank: usize) -> Credentials {
        let key = RankKey::generate().unwrap();
        let cert = ca.sign_rank(&key.csr_der().unwrap(), rank).unwrap();
        Credentials::new("mtu", rank, ca.cert_der(), cert, &key).unwrap()
    }

    /// Bulk data over loopback with path-MTU discovery allowed up to
    /// 16,000 bytes: the first window holds ten such packets, and discovery
    /// reaches the bound and stays there. quinn batches up
    /// to 10 datagrams per offloaded send; sent whole, a batch of
    /// 16,000-byte datagrams exceeded the kernel's 64 KiB per send and was
    /// dropped, so packets were lost and the path fell back to 1,200 bytes.
    #[tokio::test(flavor = "current_thread")]
    async fn large_mtus_lose_no_offloaded_batches() {
        let mut cfg = Config::default();
        cfg.set_mtu_upper_bound(16_000);
        let ca = JobCa::new("mtu", Duration::from_secs(600)).unwrap();
        let tc = transport_config(&cfg).unwrap();
        let server_tls = pki::peer_server_config(&creds(&ca, 1)).unwrap();
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
        ));
        server.transport_config(tc.clone());
        let client_tls = pki::peer_client_config(&creds(&ca, 0)).unwrap();
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        client.transport_config(tc);
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, b) = (bind(lo, &cfg).unwrap(), bind(lo, &cfg).unwrap());
        b.set_server_config(Some(server));
        let to = b.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let conn = b.accept().await.unwrap().await.unwrap();
            let mut got = 0usize;
            while let Ok(mut s) = conn.accept_uni().await {
                while let Ok(Some(c)) = s.read_chunk(usize::MAX, true).await {
                    got += c.bytes.len();
                }
            }
            got
        });
        let conn = a
            .connect_with(client, to, &pki::rank_dns_name("mtu", 1))
            .unwrap()
            .await
            .unwrap();
        // The first window holds ten packets of the largest size.
        assert!(
            conn.stats().path.cwnd >= 10 * 16_000,
            "{:?}",
            conn.stats().path
        );
        // Send until discovery has had time to climb (a hang guard, not a
        // speed limit: on loopback it takes a few round trips).
        let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut sent = 0usize;
        while sent < (64 << 20)
            || (conn.stats().path.current_mtu < 16_000 && tokio::time::Instant::now() < deadline)
        {
            let mut s = conn.open_uni().await.unwrap();
            for _ in 0..4 {
                s.write_chunk(chunk.clone()).await.unwrap();
            }
            s.finish().unwrap();
            sent += 4 * chunk.len();
        }
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        a.wait_idle().await;
        let _ = reader.await;
        // A dropped batch is a black hole to quinn: it falls back to 1,200
        // bytes. (Loss alone is not asserted: a full receive buffer on a
        // loaded machine may drop a packet or two.)
        assert_eq!(stats.path.black_holes_detected, 0, "{:?}", stats.path);
        assert_eq!(stats.path.current_mtu, 16_000, "{:?}", stats.path);
    }
}
