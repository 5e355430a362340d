//! Fault test (issue 5): a large sync while the secondary is SIGKILLed at random moments.
//! Afterwards every item converges to synced with checksums equal to the primary's, and after
//! every kill no partially written file or repository is counted as synced.
//!
//! Defaults keep CI time modest (20 kills, 240 blobs, 16 repositories). A longer run:
//!
//! ```text
//! GEO_FAULT_KILLS=200 GEO_FAULT_BLOBS=3000 GEO_FAULT_REPOS=100 \
//!     cargo test -p geoforge-tests --test replication_faults -- --nocapture
//! ```

mod replication_support;

use geoforge_tests::{Sidecar, make_bare_repo, wait_until};
use replication_support::*;
use std::path::Path;
use std::time::Duration;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic-per-run PRNG (xorshift), seeded from the clock; the seed is printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// After a kill: every row counted synced has exactly the primary's bytes/refs under its
/// final name. Returns how many rows are synced.
fn check_synced_rows_are_complete(dir: &Path) -> usize {
    let db = dir.join("s-state/registry.db");
    if !db.exists() {
        return 0;
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c
        .prepare("SELECT replicable, item_id, primary_checksum FROM registry WHERE state = 2")
        .unwrap();
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (r, id, sum) in &rows {
        if r == "blobs" {
            let got = std::fs::read(s_blobs(dir).join(id))
                .unwrap_or_else(|e| panic!("synced blob {id} missing on disk: {e}"));
            assert_eq!(&sha256(&got), sum, "synced blob {id} has other bytes");
        } else {
            let got = repo_checksum(&s_repos(dir).join(id));
            assert_eq!(
                got.as_ref(),
                Some(sum),
                "synced repository {id} has other refs"
            );
        }
    }
    rows.len()
}

fn tmp_leftovers(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".geo-tmp-") {
                out.push(e.path().display().to_string());
            } else if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                && !e.path().join("HEAD").is_file()
            {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn sigkill_at_random_moments_converges_without_partial_items_counted_synced() {
    let kills = env_num("GEO_FAULT_KILLS", 20).max(20);
    let blobs = env_num("GEO_FAULT_BLOBS", 240);
    let repos = env_num("GEO_FAULT_REPOS", 16);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("fault test: seed {seed}, {kills} kills, {blobs} blobs, {repos} repositories");
    let mut rng = Rng(seed);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    for i in 0..repos {
        make_bare_repo(
            &p_repos(dir).join(format!("g{}/r{i}.git", i % 4)),
            1 + i % 3,
        );
    }
    for i in 0..blobs {
        // Some larger blobs so kills land mid-transfer too.
        let len = if i % 10 == 0 { 256 * 1024 } else { 64 + i };
        let content: Vec<u8> = (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
        write_blob(&p_blobs(dir), &format!("{:02x}/{i}", i % 16), &content);
    }
    let p = Sidecar::start(dir, "primary", &primary_yaml(dir, &k, ""));
    let yaml = secondary_yaml(dir, &k, &p.url(), "");

    let mut max_synced = 0;
    for round in 0..kills {
        let mut s = Sidecar::start(dir, "secondary", &yaml);
        // Changes keep arriving during the run.
        if round % 5 == 4 {
            let i = rng.below(repos as u64) as usize;
            commit_to(
                &p_repos(dir).join(format!("g{}/r{i}.git", i % 4)),
                &format!("round {round}"),
            );
            let j = rng.below(blobs as u64) as usize;
            write_blob(
                &p_blobs(dir),
                &format!("{:02x}/{j}", j % 16),
                format!("updated in round {round}").as_bytes(),
            );
        }
        // A random moment (not a synchronization: any moment must be safe).
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        s.kill9();
        let synced = check_synced_rows_are_complete(dir);
        max_synced = max_synced.max(synced);
        println!("round {round}: killed with {synced} rows synced");
    }

    let s = Sidecar::start(dir, "secondary", &yaml);
    let long = Duration::from_secs(240);
    wait_synced(s.admin, &k.secondary, "blobs", blobs as i64, long);
    wait_synced(s.admin, &k.secondary, "repos", repos as i64, long);
    // Converged to the primary's current content, item by item.
    for i in 0..blobs {
        let id = format!("{:02x}/{i}", i % 16);
        let want = std::fs::read(p_blobs(dir).join(&id)).unwrap();
        wait_until(long, &format!("blob {id} equal"), || {
            (std::fs::read(s_blobs(dir).join(&id)).ok()? == want).then_some(())
        });
    }
    for i in 0..repos {
        let id = format!("g{}/r{i}.git", i % 4);
        let want = repo_checksum(&p_repos(dir).join(&id)).unwrap();
        wait_until(long, &format!("repository {id} equal"), || {
            (repo_checksum(&s_repos(dir).join(&id))? == want).then_some(())
        });
    }
    assert_eq!(check_synced_rows_are_complete(dir), blobs + repos);
    // Temporaries of killed runs are cleaned at start.
    wait_until(long, "no temporaries left", || {
        let mut l = tmp_leftovers(&s_blobs(dir));
        l.extend(tmp_leftovers(&s_repos(dir)));
        l.is_empty().then_some(())
    });
    println!("max synced before the final start: {max_synced}");
}
