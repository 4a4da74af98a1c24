//! `init_with_config`: the program's settings, with `RANKMESH_*` variables
//! overriding the same settings (as they override the defaults in `init`).
//! Its own test binary: it sets this process's environment.

use rankmesh::launch::{Seed, SeedConfig};
use rankmesh::Config;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_overrides_the_programs_settings_and_keeps_the_rest() {
    let seed = Seed::start(SeedConfig::new(1)).unwrap();
    // This binary has this one test: no other thread reads the environment
    // while it changes.
    std::env::set_var("RANKMESH_SEED", seed.addr().unwrap().to_string());
    std::env::set_var("RANKMESH_TOKEN", seed.token().to_hex());
    std::env::set_var("RANKMESH_JOB_ID", seed.job_id());
    std::env::set_var("RANKMESH_RANK", "0");
    std::env::set_var("RANKMESH_WORLD_SIZE", "1");
    std::env::set_var("RANKMESH_OP_TIMEOUT", "7");
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(3))
        .set_spin_wait(Duration::from_micros(17));
    let comm = rankmesh::init_with_config(cfg).await.unwrap();
    // Named by a variable: the variable wins.
    assert_eq!(comm.config().op_timeout(), Duration::from_secs(7));
    // Named by none: the program's value stays.
    assert_eq!(comm.config().spin_wait(), Duration::from_micros(17));
    comm.finalize().await.unwrap();
}
