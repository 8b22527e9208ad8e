//! Shared pieces of every thaw benchmark: summary statistics over samples, the
//! printed table, and the JSON report written to `bench/results/<name>.json`.
//!
//! Every benchmark binary in `src/bin/` measures a figure *and its baseline in
//! the same run* (the machines are shared and noisy, so only ratios measured
//! side by side mean anything), then builds a [`Report`] and calls
//! [`Report::finish`], which prints the table and writes the JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// Summary of a set of timing samples, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Smallest sample.
    pub min_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
}

impl Summary {
    /// Summarises durations. Returns `None` for an empty set.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Summary::of_ms(&ms)
    }

    /// Summarises samples already in milliseconds. Returns `None` for an
    /// empty set.
    pub fn of_ms(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let sum: f64 = sorted.iter().sum();
        Some(Summary {
            n,
            p50_ms: percentile(&sorted, 50.0),
            p90_ms: percentile(&sorted, 90.0),
            p99_ms: percentile(&sorted, 99.0),
            min_ms: sorted[0],
            max_ms: sorted[n - 1],
            #[allow(clippy::cast_precision_loss)] // n is a sample count, far below 2^52.
            mean_ms: sum / n as f64,
        })
    }
}

/// Nearest-rank percentile of an ascending, non-empty slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // sample counts are far below 2^52.
    let rank = (p / 100.0 * sorted.len() as f64).ceil();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // rank is in 0..=len, a small non-negative integer.
    let idx = (rank as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// One row of a report: a measured figure next to the baseline it is
/// compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured, e.g. `exec true via envd`.
    pub name: String,
    /// Unit of `value` and `baseline`, e.g. `ms p50` or `MB/s`.
    pub unit: String,
    /// The measured figure.
    pub value: f64,
    /// The baseline measured in the same run, if there is one.
    pub baseline: Option<f64>,
    /// What the baseline is, e.g. `spawn true directly`.
    pub baseline_name: Option<String>,
    /// A goal, in words, e.g. `overhead <= 1 ms`, and whether it was met.
    pub goal: Option<Goal>,
    /// Full latency distribution, where the row is a latency.
    pub summary: Option<Summary>,
    /// Distribution of the baseline, where it is a latency.
    pub baseline_summary: Option<Summary>,
}

/// A target a row is checked against.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// The goal in words.
    pub text: String,
    /// Whether this run met it.
    pub met: bool,
}

impl Row {
    /// A row with a value and no baseline.
    pub fn new(name: impl Into<String>, unit: impl Into<String>, value: f64) -> Row {
        Row {
            name: name.into(),
            unit: unit.into(),
            value,
            baseline: None,
            baseline_name: None,
            goal: None,
            summary: None,
            baseline_summary: None,
        }
    }

    /// Adds the baseline measured in the same run.
    pub fn baseline(mut self, name: impl Into<String>, value: f64) -> Row {
        self.baseline_name = Some(name.into());
        self.baseline = Some(value);
        self
    }

    /// Adds a goal and whether it was met.
    pub fn goal(mut self, text: impl Into<String>, met: bool) -> Row {
        self.goal = Some(Goal {
            text: text.into(),
            met,
        });
        self
    }

    /// Attaches the distributions the row's figures were taken from.
    pub fn summaries(mut self, value: Option<Summary>, baseline: Option<Summary>) -> Row {
        self.summary = value;
        self.baseline_summary = baseline;
        self
    }

    /// `value / baseline`, where a baseline exists and is non-zero.
    pub fn ratio(&self) -> Option<f64> {
        match self.baseline {
            Some(b) if b != 0.0 => Some(self.value / b),
            _ => None,
        }
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The CPU model from /proc/cpuinfo, if known.
    pub cpu: Option<String>,
    /// Total memory in bytes, from /proc/meminfo.
    pub memory_bytes: Option<u64>,
}

impl Machine {
    /// Reads the facts of this machine.
    pub fn detect() -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        });
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        Machine {
            cores,
            kernel,
            cpu,
            memory_bytes,
        }
    }
}

/// A benchmark's result: what it measured, where and when.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Benchmark name; also the JSON file's stem.
    pub name: String,
    /// One sentence saying what the benchmark measures and how.
    pub description: String,
    /// RFC 3339 UTC time the report was finished.
    pub date: String,
    /// `git rev-parse HEAD` of the tree measured, if known.
    pub commit: Option<String>,
    /// The machine.
    pub machine: Machine,
    /// Parameters of the run (repetitions, sizes, concurrency...).
    pub parameters: serde_json::Value,
    /// The figures.
    pub rows: Vec<Row>,
    /// Free-form notes, printed under the table.
    pub notes: Vec<String>,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Creating the results directory or writing the file failed.
    #[error("writing {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serialising the report failed.
    #[error("serialising the report")]
    Json(#[source] serde_json::Error),
}

impl Report {
    /// Starts a report for benchmark `name`.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Report {
        Report {
            name: name.into(),
            description: description.into(),
            date: String::new(),
            commit: git_commit(),
            machine: Machine::detect(),
            parameters: serde_json::Value::Null,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records the parameters of the run.
    pub fn parameters(&mut self, parameters: serde_json::Value) -> &mut Report {
        self.parameters = parameters;
        self
    }

    /// Adds a row.
    pub fn row(&mut self, row: Row) -> &mut Report {
        self.rows.push(row);
        self
    }

    /// Adds a note printed under the table.
    pub fn note(&mut self, note: impl Into<String>) -> &mut Report {
        self.notes.push(note.into());
        self
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("== {}: {}\n", self.name, self.description));
        out.push_str(&format!(
            "   {} cores, kernel {}, commit {}\n",
            self.machine.cores,
            self.machine.kernel,
            self.commit.as_deref().unwrap_or("unknown")
        ));
        let header = [
            "figure", "unit", "value", "baseline", "ratio", "goal", "met",
        ];
        let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        for r in &self.rows {
            lines.push([
                r.name.clone(),
                r.unit.clone(),
                fmt_num(r.value),
                match (&r.baseline_name, r.baseline) {
                    (Some(n), Some(b)) => format!("{} ({n})", fmt_num(b)),
                    _ => "-".to_owned(),
                },
                r.ratio().map_or("-".to_owned(), |x| format!("{x:.2}x")),
                r.goal.as_ref().map_or("-".to_owned(), |g| g.text.clone()),
                r.goal.as_ref().map_or("-".to_owned(), |g| {
                    if g.met { "yes" } else { "NO" }.to_owned()
                }),
            ]);
        }
        let mut widths = [0usize; 7];
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .zip(widths.iter())
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(&format!("   {}\n", cells.join("  ").trim_end()));
        }
        for n in &self.notes {
            out.push_str(&format!("   note: {n}\n"));
        }
        out
    }

    /// Stamps the date, prints the table and writes
    /// `<results_dir>/<name>.json`, where `results_dir` is `$THAW_BENCH_RESULTS`
    /// or `bench/results` beside this crate. Returns the file written.
    pub fn finish(&mut self) -> Result<PathBuf, ReportError> {
        let dir = std::env::var_os("THAW_BENCH_RESULTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"));
        self.finish_in(&dir)
    }

    /// As [`Report::finish`], into a given directory.
    pub fn finish_in(&mut self, dir: &Path) -> Result<PathBuf, ReportError> {
        self.date = now_rfc3339();
        print!("{}", self.table());
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(format!("{}.json", self.name));
        let json = serde_json::to_vec_pretty(self).map_err(ReportError::Json)?;
        std::fs::write(&path, json).map_err(|source| ReportError::Write {
            path: path.clone(),
            source,
        })?;
        println!("   wrote {}", path.display());
        Ok(path)
    }
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Summary::of_ms(&(1..=100).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!(s.n, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p90_ms, 90.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.mean_ms, 50.5);
    }

    #[test]
    fn single_sample_and_empty() {
        let s = Summary::of(&[Duration::from_millis(3)]).unwrap();
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!(s.p99_ms, 3.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn report_writes_json_with_ratio() {
        let dir = tempfile_dir();
        let mut r = Report::new("unit_test_report", "a test");
        r.row(
            Row::new("x", "ms p50", 2.0)
                .baseline("floor", 1.0)
                .goal("<= 3x", true),
        );
        let path = r.finish_in(&dir).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["rows"][0]["value"], 2.0);
        assert_eq!(v["rows"][0]["baseline"], 1.0);
        assert!(v["date"].as_str().unwrap().ends_with('Z'));
        assert!(r.table().contains("2.00x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("thaw-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
