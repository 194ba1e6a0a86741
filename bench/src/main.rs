//! `bench`: Sluice's benchmarks and load tools.
//!
//! The simulated vLLM they run against by default is its own crate,
//! `sluice_sim` (`bench/sim`); `bench sim`, `bench calibrate` and
//! `bench sim-vs-real` are its commands.
//!
//! # Layout
//!
//! Bottom to top: a module uses only modules of the layers below its own.
//!
//! 1. Leaves.
//!    - [`client`]: the one HTTP client every benchmark sends with: a
//!      request (method, path, body, extra headers, deadline) on a
//!      keep-alive connection; reads status, usage and a stream's first
//!      token, or names the failure.
//!    - [`progress`]: a progress bar on a terminal, plain lines otherwise.
//!    - [`procs`]: starting and stopping the proxy, `hyper-floor`
//!      (`bench/floor`) and nginx as child processes; the flags every
//!      proxy gets (`--upstream` once per engine) and `--route`.
//!    - [`proxy`]: the proxy a configuration sends through (a child
//!      process or in-process), its addresses and CPU time.
//!    - [`fast_upstream`]: a minimal upstream that answers at once.
//! 2. What is sent, and what came back.
//!    - [`stats`]: each request's sample, a run's outcomes (HDR
//!      histograms), their summary; Prometheus counters; the median.
//!    - [`workload`]: the synthetic candidate-evaluation requests (or a
//!      JSONL file).
//!    - [`engine`]: the engine a benchmark drives (the in-process simulator
//!      or one at a URL) and what it says about itself.
//! 3. [`load`]: sending over time — the client modes (batched waves,
//!    inngest semaphore, open-loop Poisson rate, naive clients), open-loop
//!    arrivals sent as a client habit says, and the fixed loops of
//!    `bench overhead`.
//! 4. What a run means.
//!    - [`measure`]: one run driven and measured: the client's view, the
//!      proxy's `/stats`, the engine's prefix cache, the GPUs.
//!    - [`scenario`]: `bench compare`'s scenarios (batch job, live
//!      traffic, mixed) driven against given targets, and their results.
//! 5. [`sweep`]: open-loop rate steps judged for saturation.
//! 6. [`plot`]: the SVG plots (latency CDF and throughput bars; the
//!    scenarios' panels).
//! 7. Reports.
//!    - [`report`]: the `benchmark_*.json` schema and the Markdown tables.
//!    - [`scorecard`]: the `compare_*.json` schema, the scenarios' tables
//!      and who wins each against the best client habit.
//! 8. The commands, each on the layers below and none on another:
//!    - [`compare`]: `bench compare` — what `just bench` runs: the client
//!      habits, naive clients and Sluice with each policy in the same
//!      scenarios (batch job, live traffic, mixed, the static frontier and
//!      adaptive's SLO mode), with a winner per scenario; or, with
//!      `--requests`, the single-table comparison; or, with `--replicas`,
//!      [`replicas`]: Sluice's routing over N engine replicas, each with a
//!      prefix cache of its own, against one replica alone (what `just
//!      bench-replicas` runs).
//!    - [`run`]: `bench run` — one client mode, or a rate sweep to
//!      saturation, against any target.
//!    - [`suite`]: `bench suite` — batching, cache resume and memory, each
//!      against its target, in one report.
//!    - [`overhead`]: `bench overhead` — what the proxy adds over talking
//!      to an upstream directly, and over `hyper-floor` and nginx (when
//!      built and installed): latency and maximum throughput, in one run.
//!    - [`telemetry_cost`]: `bench telemetry-cost` — what recording metrics
//!      costs per request, in instructions counted by callgrind.
//!    - [`policy_cost`]: `bench policy-cost` — the cost of one policy event
//!      including the wasm call.
//!    - [`sim_reference`]: `bench sim-vs-reference` — the simulator against
//!      the reference GPU benchmark's two client modes.

mod bodies;
mod client;
mod compare;
mod engine;
mod fast_upstream;
mod load;
mod measure;
mod overhead;
mod plot;
mod policy_cost;
mod procs;
mod progress;
mod proxy;
mod replicas;
mod report;
mod run;
mod scenario;
mod scorecard;
mod sim_reference;
mod soak;
mod stats;
mod suite;
mod sweep;
mod telemetry_cost;
mod workload;

use clap::{Parser, Subcommand};

/// Sluice's benchmarks and load tools.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Admission policies vs the two client habits in job-worker scenarios (what `just bench` runs).
    Compare(compare::Args),
    /// One client mode (batched, inngest, rate, naive) against one target.
    Run(run::Args),
    /// Added latency and max throughput: direct vs through the proxy (vs hyper-floor, nginx).
    Overhead(overhead::Args),
    /// Cost of one admission-policy event including the wasm call.
    PolicyCost(policy_cost::Args),
    /// What large request bodies (token-id prompts) do to small requests' latency and to the proxy's memory.
    Bodies(bodies::Args),
    /// The proxy's memory over a long run at steady load (`--duration 1h`), with or without a /metrics scraper.
    Soak(soak::Args),
    /// The suite: batching, cache resume and memory, each against its target.
    Suite(suite::Args),
    /// What recording metrics costs per request, in instructions (callgrind).
    TelemetryCost(telemetry_cost::Args),
    /// Serve a simulated vLLM (same routes and metrics) from a profile.
    Sim(sluice_sim::Args),
    /// Measure a real engine and fit a simulator profile to it (TOML).
    Calibrate(sluice_sim::calibrate::CalibrateArgs),
    /// Fit the simulator to a real engine and predict held-out workloads, side by side.
    SimVsReal(sluice_sim::calibrate::VersusArgs),
    /// The simulator (rtx4080) vs the reference GPU benchmark, both client modes.
    SimVsReference(sim_reference::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Compare(args) => runtime.block_on(compare::run(args)),
        Command::Run(args) => runtime.block_on(run::run(args)),
        Command::Overhead(args) => runtime.block_on(overhead::run(args)),
        Command::PolicyCost(args) => policy_cost::run(args),
        Command::Bodies(args) => runtime.block_on(bodies::run(args)),
        Command::Soak(args) => runtime.block_on(soak::run(args)),
        Command::Suite(args) => runtime.block_on(suite::run(args)),
        Command::TelemetryCost(args) => runtime.block_on(telemetry_cost::run(args)),
        Command::Sim(args) => runtime.block_on(sluice_sim::run(args)),
        Command::Calibrate(args) => runtime.block_on(sluice_sim::calibrate::calibrate(args)),
        Command::SimVsReal(args) => runtime.block_on(sluice_sim::calibrate::versus(args)),
        Command::SimVsReference(args) => runtime.block_on(sim_reference::run(args)),
    }
}
