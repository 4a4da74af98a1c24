//! The encryption ceiling of the QUIC path on one core:
//! `cargo bench -p rankmesh --bench aead`.
//!
//! Every byte rankmesh sends over QUIC is sealed once by the sender and
//! opened once by the receiver with the TLS 1.3 AEAD the handshake chose
//! (ring's AES-GCM; one extra AES block per packet protects its header).
//! This times both, per packet payload size, on warm buffers. A rank that
//! sends and receives at the same rate on one core cannot move more than
//! `1 / (1/seal + 1/open)` bytes per second each way: the ceiling that
//! docs/performance.md compares the QUIC figures with.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use std::time::Instant;

/// UDP payloads of QUIC packets at the path MTUs that matter: 1200 (QUIC's
/// minimum), 1500 and 9000 Ethernet, and 4000 (rankmesh's default bound for
/// path-MTU discovery).
const PAYLOADS: [(usize, &str); 4] = [
    (1200 - 28, "MTU 1200"),
    (1500 - 28, "MTU 1500"),
    (4000 - 28, "MTU 4000"),
    (9000 - 28, "MTU 9000"),
];

/// Bytes sealed or opened per measurement.
const TOTAL: usize = 512 << 20;

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("| AEAD | packet | seal (GB/s) | open (GB/s) | both on one core (GB/s) |");
    println!("|---|---|---:|---:|---:|");
    for (alg, name) in [(&AES_128_GCM, "AES-128-GCM"), (&AES_256_GCM, "AES-256-GCM")] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]).unwrap());
        for (len, label) in PAYLOADS {
            // A packet's payload; the header (about 25 bytes) is the AAD.
            let header = [0x40u8; 25];
            let mut pkt = vec![0x5au8; len - header.len() - alg.tag_len()];
            let packets = TOTAL / pkt.len();
            let mut sealed = Vec::new();
            let t = Instant::now();
            for i in 0..packets as u64 {
                let tag = key
                    .seal_in_place_separate_tag(nonce(i), Aad::from(&header), &mut pkt)
                    .unwrap();
                if i == 0 {
                    sealed = pkt.clone();
                    sealed.extend_from_slice(tag.as_ref());
                }
                std::hint::black_box(&tag);
            }
            let seal = (packets * pkt.len()) as f64 / t.elapsed().as_secs_f64() / 1e9;
            // Open the first sealed packet again and again, refilling the
            // buffer after each open (which decrypts in place).
            let mut buf = sealed.clone();
            let t = Instant::now();
            for _ in 0..packets {
                let r = key.open_in_place(nonce(0), Aad::from(&header), &mut buf);
                assert!(r.is_ok(), "a sealed packet must open");
                buf.copy_from_slice(&sealed);
            }
            let el = t.elapsed().as_secs_f64();
            // Subtract the refill copy, timed alone.
            let t = Instant::now();
            for _ in 0..packets {
                buf.copy_from_slice(std::hint::black_box(&sealed));
            }
            let copy = t.elapsed().as_secs_f64();
            let open = (packets * pkt.len()) as f64 / (el - copy).max(1e-9) / 1e9;
            let both = 1.0 / (1.0 / seal + 1.0 / open);
            println!("| {name} | {label} | {seal:.2} | {open:.2} | {both:.2} |");
        }
    }
}
