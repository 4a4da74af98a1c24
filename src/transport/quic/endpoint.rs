//! The UDP socket and quinn settings of a rank's single endpoint.

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
    let std_sock = socket(addr, cfg)?;
    // quinn caps the UDP payload it accepts (and so the path MTU it can
    // discover) at 1472 bytes unless told otherwise; raise the cap to the
    // configured MTU upper bound so that discovery can reach it.
    let mut ep_cfg = quinn::EndpointConfig::default();
    ep_cfg
        .max_udp_payload_size(cfg.mtu_upper_bound())
        .map_err(|e| Error::config(format!("MTU upper bound: {e}")))?;
    quinn::Endpoint::new(ep_cfg, None, std_sock, Arc::new(quinn::TokioRuntime)).map_err(|e| {
        Error::transport(
            None,
            format!("cannot start endpoint on UDP socket on {addr}: {e}"),
        )
    })
}

/// A UDP socket bound to `addr`, with the configured buffer sizes, for an
/// endpoint (or for [`quinn::Endpoint::rebind`]).
pub fn socket(addr: SocketAddr, cfg: &Config) -> Result<std::net::UdpSocket> {
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
    Ok(Arc::new(t))
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
