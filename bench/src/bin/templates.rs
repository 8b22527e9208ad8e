//! Template builds and what a snapshot saves:
//! - build time per runtime, cold (a fresh layer cache; the debootstrap base
//!   is timed once on its own) and cached (unchanged recipe);
//! - root filesystem size per runtime;
//! - for python-data, the time until `import numpy, pandas, matplotlib` is
//!   done in a cold runsc sandbox: what every job would pay without a
//!   snapshot, beside a cold sandbox running `python3 -c pass`.
//!
//! `cargo run --release -p bench --bin templates` (root; runsc, debootstrap,
//! network for packages).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{Report, Row, Summary};
use template::builder::{build, tree_size, BuildConfig};
use template::sandbox::{run_step, StepSpec, StepUser};

const RUNTIMES: [&str; 4] = ["bash", "python", "node", "python-data"];
const COLD_RUNS: usize = 5;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn config(cache: &Path, data: &Path) -> BuildConfig {
    BuildConfig::new(&repo().join("runtimes"), cache, data)
}

/// Runs `argv` in a cold sandbox of `rootfs`; returns wall time and stdout.
fn cold(rootfs: &Path, cfg: &BuildConfig, argv: &[&str], n: usize) -> Result<(Duration, String)> {
    let work = tempfile::tempdir()?;
    let spec = StepSpec {
        rootfs,
        argv: argv.iter().map(|s| (*s).to_string()).collect(),
        env: vec![("MPLBACKEND".into(), "Agg".into())],
        cwd: "/".into(),
        user: StepUser::root(),
        binds: Vec::new(),
        network: "none",
        readonly_root: true,
    };
    let mut out = String::new();
    let t = Instant::now();
    let code = run_step(
        &cfg.runsc,
        work.path(),
        &format!("thaw-bench-{}-{n}", std::process::id()),
        &spec,
        &mut |l| {
            out.push_str(l);
            out.push('\n');
        },
    )?;
    let elapsed = t.elapsed();
    if code != Some(0) {
        bail!("{argv:?} failed in the sandbox: {out}");
    }
    Ok((elapsed, out))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> Result<()> {
    let shared = std::env::var_os("THAW_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/thaw"), PathBuf::from);
    let data = tempfile::tempdir()?;
    let mut report = Report::new(
        "templates",
        "template builds from runtimes/ recipes (cold and cached), root filesystem sizes, and the cold-sandbox import cost that a python-data snapshot removes",
    );
    report.parameters(serde_json::json!({"runtimes": RUNTIMES, "cold_import_runs": COLD_RUNS, "platform": "ptrace"}));

    // The base, timed once in a fresh cache.
    let fresh = tempfile::tempdir_in(shared.parent().unwrap_or(Path::new("/var/cache")))?;
    let t = Instant::now();
    build("bash", &config(fresh.path(), data.path()), &mut |_| {})
        .context("building bash in a fresh cache")?;
    let bash_from_nothing = t.elapsed();
    report.row(Row::new(
        "bash from nothing (debootstrap base + layer)",
        "s",
        secs(bash_from_nothing),
    ));

    let mut built = Vec::new();
    for name in RUNTIMES {
        // Cold layer: the fresh cache has the base; the layer is new.
        let cfg = config(fresh.path(), data.path());
        let t = Instant::now();
        let tpl = if name == "bash" {
            build(name, &cfg, &mut |_| {})?
        } else {
            let tpl = build(name, &cfg, &mut |_| {})?;
            report.row(Row::new(
                format!("{name}: cold build (base cached)"),
                "s",
                secs(t.elapsed()),
            ));
            tpl
        };
        let t = Instant::now();
        build(name, &cfg, &mut |_| {})?;
        let cached = t.elapsed();
        report.row(
            Row::new(format!("{name}: cached rebuild"), "s", secs(cached))
                .goal("a few seconds at most", cached < Duration::from_secs(5)),
        );
        #[allow(clippy::cast_precision_loss)] // sizes far below 2^52.
        let mib = tree_size(&tpl.rootfs) as f64 / f64::from(1u32 << 20);
        report.row(Row::new(format!("{name}: root filesystem"), "MiB", mib));
        built.push((name, tpl, cfg));
    }

    let (_, data_tpl, cfg) = built
        .iter()
        .find(|(n, _, _)| *n == "python-data")
        .context("python-data was not built")?;
    let mut imports = Vec::new();
    let mut inner = Vec::new();
    let mut bare = Vec::new();
    for n in 0..COLD_RUNS {
        let (wall, out) = cold(
            &data_tpl.rootfs,
            cfg,
            &["/usr/bin/python3", "-c", "import time; t = time.time(); import numpy, pandas, matplotlib.pyplot; print(time.time() - t)"],
            2 * n,
        )?;
        imports.push(wall);
        if let Ok(s) = out.trim().lines().last().unwrap_or("").parse::<f64>() {
            inner.push(s * 1e3);
        }
        bare.push(
            cold(
                &data_tpl.rootfs,
                cfg,
                &["/usr/bin/python3", "-c", "pass"],
                2 * n + 1,
            )?
            .0,
        );
    }
    let imports_s = Summary::of(&imports).context("samples")?;
    let bare_s = Summary::of(&bare).context("samples")?;
    let inner_s = Summary::of_ms(&inner).context("samples")?;
    report
        .row(
            Row::new("python-data: cold sandbox, python3 + import numpy, pandas, matplotlib", "ms p50", imports_s.p50_ms)
                .baseline("cold sandbox, python3 -c pass", bare_s.p50_ms)
                .summaries(Some(imports_s), Some(bare_s)),
        )
        .row(Row::new("python-data: the imports alone, timed inside the cold sandbox", "ms p50", inner_s.p50_ms))
        .note("a warm python-data runner has these imports done before the snapshot: a job pays none of it (envd/tests and vmhost/template/tests/runtimes.rs check the imports are warm)")
        .note(format!("the fresh cache for cold builds was {}", fresh.path().display()));
    report.finish()?;
    Ok(())
}
