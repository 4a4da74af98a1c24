//! Hosts, slots and which rank runs where.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// A host and its number of slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub slots: usize,
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub host: String,
    pub local: bool,
    pub local_rank: usize,
    pub local_size: usize,
}

fn parse_slots(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number of slots")),
    }
}

/// `a:2,b,c:4` (IPv6 addresses in brackets: `[::1]:2`).
pub fn parse_host_list(s: &str) -> Result<Vec<HostSpec>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, slots) = if let Some(rest) = item.strip_prefix('[') {
            let (h, tail) = rest
                .split_once(']')
                .ok_or_else(|| format!("{item:?}: missing ']'"))?;
            match tail.strip_prefix(':') {
                Some(n) => (h.to_string(), parse_slots(n)?),
                None if tail.is_empty() => (h.to_string(), 1),
                None => return Err(format!("{item:?}: expected HOST[:SLOTS]")),
            }
        } else {
            match item.split_once(':') {
                Some((h, n)) => (h.to_string(), parse_slots(n)?),
                None => (item.to_string(), 1),
            }
        };
        if name.is_empty() {
            return Err(format!("{item:?}: empty host name"));
        }
        out.push(HostSpec { name, slots });
    }
    if out.is_empty() {
        return Err("no hosts given".into());
    }
    Ok(out)
}

/// Hostfile lines: `host [slots=N]`, `#` comments.
pub fn parse_hostfile(text: &str) -> Result<Vec<HostSpec>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let mut words = l.split_whitespace();
        let name = words.next().unwrap_or_default().to_string();
        let mut slots = 1;
        for w in words {
            match w.split_once('=') {
                Some(("slots", n)) => {
                    slots = parse_slots(n).map_err(|e| format!("line {}: {e}", i + 1))?
                }
                Some(("max_slots", _)) => {}
                _ => {
                    return Err(format!(
                        "line {}: unexpected {w:?} (lines are `host slots=N`)",
                        i + 1
                    ))
                }
            }
        }
        out.push(HostSpec { name, slots });
    }
    Ok(out)
}

/// This machine's host name.
pub fn hostname() -> String {
    rankmesh::launch::hostname()
}

/// Whether `host` names this machine (started without the launch agent).
pub fn is_local(host: &str) -> bool {
    let me = hostname();
    let short = me.split('.').next().unwrap_or(&me);
    matches!(host, "localhost" | "127.0.0.1" | "::1") || host == me || host == short
}

/// Fill hosts in order; beyond the slots (only with oversubscription) wrap
/// around one rank per host at a time.
pub fn place(hosts: &[HostSpec], np: usize) -> Vec<Placement> {
    let mut counts: Vec<usize> = Vec::with_capacity(hosts.len());
    let mut left = np;
    for h in hosts {
        let c = h.slots.min(left);
        counts.push(c);
        left -= c;
    }
    let mut i = 0;
    while left > 0 && !hosts.is_empty() {
        counts[i % hosts.len()] += 1;
        left -= 1;
        i += 1;
    }
    let mut out: Vec<Placement> = Vec::with_capacity(np);
    for (h, &c) in hosts.iter().zip(&counts) {
        for _ in 0..c {
            let local_rank = out.iter().filter(|p| p.host == h.name).count();
            out.push(Placement {
                rank: out.len(),
                host: h.name.clone(),
                local: is_local(&h.name),
                local_rank,
                local_size: 0,
            });
        }
    }
    let sizes: Vec<usize> = out
        .iter()
        .map(|p| out.iter().filter(|q| q.host == p.host).count())
        .collect();
    for (p, s) in out.iter_mut().zip(sizes) {
        p.local_size = s;
    }
    out
}

/// The local IP that routes to `host` (no packet is sent).
pub fn route_ip_to(host: &str) -> Result<IpAddr, String> {
    let target = (host, 22)
        .to_socket_addrs()
        .map_err(|e| format!("host {host:?} does not resolve ({e})"))?
        .next()
        .ok_or_else(|| format!("host {host:?} has no address"))?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bad address".to_string())?
    } else {
        "[::]:0".parse().map_err(|_| "bad address".to_string())?
    };
    UdpSocket::bind(any)
        .and_then(|s| s.connect(target).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .map_err(|e| format!("no route to {host} ({target}): {e}"))
}

/// Resolve `--seed-addr` (`IP`, `IP:PORT`, `[V6]:PORT`, `NAME`, `NAME:PORT`).
pub fn parse_seed_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let with_port = if s.contains(':') {
        s.to_string()
    } else {
        format!("{s}:0")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("--seed-addr {s}: {e}"))?
        .next()
        .ok_or_else(|| format!("--seed-addr {s}: no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lists() {
        let h = parse_host_list("a:2, b ,[::1]:3").unwrap();
        assert_eq!(
            h.iter()
                .map(|h| (h.name.as_str(), h.slots))
                .collect::<Vec<_>>(),
            vec![("a", 2), ("b", 1), ("::1", 3)]
        );
        assert!(parse_host_list("a:0").is_err());
        assert!(parse_host_list("a:x").is_err());
        assert!(parse_host_list(",").is_err());
    }

    #[test]
    fn hostfiles() {
        let h = parse_hostfile("# c\nnode1 slots=4\n\nnode2   # one\n").unwrap();
        assert_eq!(h[0].slots, 4);
        assert_eq!((h[1].name.as_str(), h[1].slots), ("node2", 1));
        assert!(parse_hostfile("n slots=0").is_err());
        assert!(parse_hostfile("n cpus=3").is_err());
    }

    #[test]
    fn placement_fills_in_order() {
        let hosts = parse_host_list("a:2,b:2").unwrap();
        let p = place(&hosts, 3);
        assert_eq!(
            p.iter()
                .map(|p| (p.host.as_str(), p.local_rank, p.local_size))
                .collect::<Vec<_>>(),
            vec![("a", 0, 2), ("a", 1, 2), ("b", 0, 1)]
        );
        let p = place(&hosts, 6);
        assert_eq!(p.iter().filter(|p| p.host == "a").count(), 3);
        assert_eq!(p.len(), 6);
        assert!(p.iter().all(|p| p.local_size == 3));
    }
}
