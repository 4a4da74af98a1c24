//! The seed under an unauthenticated flood: how long a 2-rank job takes to
//! form, and how much the seed's resident memory grows, while `--conns`
//! clients without the token keep connections open and push data at it for
//! `--secs` seconds (each reconnects when the seed drops it). The seed runs
//! in a child process (this binary again) so that its memory is measured
//! alone; the ranks and the attackers run here.
//!
//! ```text
//! cargo bench --bench seedflood -- [--conns 1000] [--secs 10] [--trials 3] [--from 127.0.0.2]
//! ```
//!
//! The attackers connect from 127.0.0.1, the ranks' own address, unless
//! `--from` names another loopback address (an attacker on another host,
//! which the seed limits per source address).

#[path = "../tests/flood/mod.rs"]
mod flood;

use rankmesh::launch::JoinSpec;
use rankmesh::Config;
use std::time::{Duration, Instant};

/// Join both ranks; the time until both are formed.
async fn form(seed: &flood::SeedChild) -> Duration {
    let spec = |rank| JoinSpec {
        seed: seed.addr,
        token: seed.token.clone(),
        job_id: Some(seed.job.clone()),
        rank: Some(rank),
        world_size: Some(2),
        host: "localhost".into(),
        late: false,
    };
    let mut cfg = Config::default();
    cfg.set_formation_timeout(Duration::from_secs(120));
    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        rankmesh::launch::init_with(spec(0), cfg.clone()),
        rankmesh::launch::init_with(spec(1), cfg.clone())
    );
    let took = t0.elapsed();
    let (a, b) = (a.expect("rank 0"), b.expect("rank 1"));
    let _ = tokio::join!(a.finalize(), b.finalize());
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Some(out) = std::env::var_os(flood::SEED_OUT) {
        return flood::seed_child_main(out, 600);
    }
    let args: Vec<String> = std::env::args().collect();
    let conns = arg(&args, "--conns", 1000) as usize;
    let secs = arg(&args, "--secs", 10);
    let trials = arg(&args, "--trials", 3).max(1) as usize;
    let from: std::net::IpAddr = args
        .iter()
        .position(|a| a == "--from")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--from takes an IP address"))
        .unwrap_or([127, 0, 0, 1].into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut quiet = Vec::new();
        for _ in 0..trials.max(5) {
            let seed = flood::SeedChild::start(&[]).await;
            quiet.push(form(&seed).await.as_secs_f64() * 1e3);
        }
        let base = median(quiet.clone());
        println!("formation without attack: median {base:.1} ms of {quiet:.1?}");
        println!("attackers connect from {from}");
        println!(
            "| trial | attackers | formation under attack (ms) | vs quiet | seed RSS before (MB) | peak (MB) | growth (MB) | handshakes |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in 0..trials {
            let seed = flood::SeedChild::start(&[]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let pid = seed.pid();
            let before = flood::rss(pid);
            let started = Instant::now();
            let f = flood::Flood::start_from(seed.addr, from, conns, flood::Mode::PushAgain);
            let sampler = tokio::spawn(async move {
                let mut peak = 0;
                while started.elapsed() < Duration::from_secs(secs) {
                    peak = peak.max(flood::rss(pid));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                peak
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            let took = form(&seed).await.as_secs_f64() * 1e3;
            let peak = sampler.await.expect("sampler");
            let handshakes = f.connected.load(std::sync::atomic::Ordering::Relaxed);
            f.stop().await;
            let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!(
                "| {t} | {conns} | {took:.1} | {:.1}x | {:.1} | {:.1} | {:.1} | {handshakes} |",
                took / base,
                mb(before),
                mb(peak),
                mb(peak.saturating_sub(before)),
            );
        }
    });
}
