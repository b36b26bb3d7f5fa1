//! The one wasmtime `Engine` of a connector: component model, pooling allocator with
//! copy-on-write memory images, epoch interruption driven by a ticker thread, and a `Linker`
//! holding exactly the imports a plugin may use.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::path::Path;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::Plugin as PluginWorld;
use super::host::StoreData;

/// Period of the epoch ticker: running guest code yields to the async runtime this often.
pub const TICK: Duration = Duration::from_millis(1);

/// Largest instance pool a configuration may ask for (see
/// [`crate::config::ConnectorConfig::plugin_instances`]).
pub const MAX_INSTANCES: usize = 20_000;

/// Imports of [`ALLOWED_IMPORTS`] a plugin may have only with a grant: (import, grant).
pub const GRANTED_IMPORTS: &[(&str, &str)] = &[
    ("sluice:plugin/kv", "kv"),
    ("sluice:plugin/metrics", "metrics"),
    ("sluice:plugin/http", "http"),
];

/// Imports a plugin may have, without their `@version`. Everything else (filesystem, sockets,
/// outbound HTTP…) is refused at load time; those of [`GRANTED_IMPORTS`] need their grant.
pub const ALLOWED_IMPORTS: &[&str] = &[
    "sluice:plugin/types",
    "sluice:plugin/log",
    "sluice:plugin/audit",
    "sluice:plugin/context",
    "sluice:plugin/kv",
    "sluice:plugin/metrics",
    "sluice:plugin/http",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// How the process returns freed heap memory to the operating system, when its allocator
/// can (set once by the binary, which chooses the allocator).
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Installs the routine that returns freed heap memory to the operating system. Compiling a
/// plugin takes tens of megabytes of scratch memory that the allocator would otherwise keep
/// mapped for the life of the process.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// Returns the compiler's freed scratch memory to the operating system, once a set of plugins
/// is loaded.
pub fn release_compiler_memory() {
    if let Some(release) = RELEASE_MEMORY.get() {
        release();
    }
}

/// Why a helper process did not compile a plugin.
#[derive(Debug)]
pub enum HelperError {
    /// The plugin does not compile: the compiler's message.
    Plugin(String),
    /// The helper could not run or answer (it is then compiled in this process).
    Helper(String),
}

/// Compiles a plugin in a helper process: given the `.wasm` path and the engine's settings
/// (largest memory, instances), the serialized component of [`Runtime::compile_serialized`].
pub type Compiler = fn(&Path, usize, u32) -> Result<Vec<u8>, HelperError>;

/// The helper the binary installs; without one (the library in tests), plugins compile in
/// this process.
static COMPILER: std::sync::OnceLock<Compiler> = std::sync::OnceLock::new();

/// Installs the helper that compiles plugins outside this process. Compiling takes tens of
/// megabytes of scratch memory and pages in the compiler's code; in a helper, neither ever
/// enters the long-running connector, which only maps the finished machine code.
pub fn set_compiler(compiler: Compiler) {
    let _ = COMPILER.set(compiler);
}

/// Why the runtime could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("failed to set up the WebAssembly runtime: {0:#}")]
pub struct RuntimeError(#[from] wasmtime::Error);

/// Engine, linker and epoch ticker, shared by every plugin (and kept across reloads).
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<StoreData>,
    /// Size of the instance pool.
    pub instances: u32,
    /// Largest memory an instance may have.
    max_memory: usize,
    /// The plugins' key-value namespaces (kept as long as the runtime, across reloads).
    pub kv: super::kv::KvStore,
    ticker: Ticker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

impl Runtime {
    /// An engine with room for `instances` live component instances (all plugins together,
    /// idle pooled ones included), each of whose memories may grow to `max_memory` bytes.
    pub fn new(max_memory: usize, instances: u32) -> Result<Arc<Runtime>, RuntimeError> {
        let engine = Engine::new(&config(max_memory, instances))?;

        let mut linker: Linker<StoreData> = Linker::new(&engine);
        PluginWorld::add_to_linker::<StoreData, HasSelf<StoreData>>(&mut linker, |s| s)?;
        // Components built against 0.1.0 import its interfaces, which stay linked.
        super::bindings::v0_1::Plugin::add_to_linker::<StoreData, HasSelf<StoreData>>(
            &mut linker,
            |s| s,
        )?;
        add_wasi(&mut linker)?;
        let ticker = Ticker::start(engine.clone()).map_err(wasmtime::Error::from)?;
        Ok(Arc::new(Runtime {
            ticker,
            engine,
            linker,
            instances,
            max_memory,
            kv: Default::default(),
        }))
    }

    /// Call around every entry into guest code: while any runs, the epoch ticks.
    pub(super) fn running(&self) -> Running<'_> {
        self.ticker.running()
    }

    /// The component of `wasm`, compiled for this engine: by the helper process when the
    /// binary installed one, else here (and here too when the helper cannot run). Blocking:
    /// call it on a blocking thread.
    pub fn compile(&self, wasm: &Path) -> Result<(Component, Compiled), String> {
        check_header(wasm)?;
        if let Some(compiler) = COMPILER.get() {
            match compiler(wasm, self.max_memory, self.instances) {
                // SAFETY: the bytes are what `compile_serialized` produced in a helper run from
                // this process's own image (`/proc/self/exe`), for an engine of these very
                // settings, passed through a pipe of its own: nothing else can have written
                // them. wasmtime still checks that they match this engine (its version and
                // settings) and refuses them otherwise.
                Ok(bytes) => match unsafe { Component::deserialize(&self.engine, &bytes) } {
                    Ok(component) => return Ok((component, Compiled::Helper)),
                    Err(e) => {
                        tracing::warn!(cause = %format!("{e:#}"), "the plugin compiled by the helper process does not fit this engine; compiling in this process")
                    }
                },
                Err(HelperError::Plugin(message)) => return Err(message),
                Err(HelperError::Helper(cause)) => {
                    tracing::warn!(%cause, "could not compile the plugin in a helper process; compiling in this process")
                }
            }
        }
        Component::from_file(&self.engine, wasm)
            .map(|c| (c, Compiled::InProcess))
            .map_err(|e| format!("{e:#}"))
    }

    /// What a helper process runs: compiles `wasm` for an engine of these settings and returns
    /// it serialized, or the compiler's message.
    pub fn compile_serialized(
        wasm: &Path,
        max_memory: usize,
        instances: u32,
    ) -> Result<Vec<u8>, String> {
        let engine = Engine::new(&config(max_memory, instances)).map_err(|e| format!("{e:#}"))?;
        let component = Component::from_file(&engine, wasm).map_err(|e| format!("{e:#}"))?;
        component.serialize().map_err(|e| format!("{e:#}"))
    }
}

/// Refuses, with a message that says what to do, a file that is not a WebAssembly component:
/// a core module (what `wasm32-wasip1` or `wasm32-unknown-unknown` builds give), or no
/// WebAssembly at all. The compiler's own message for these is a parser error.
fn check_header(wasm: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let n = std::fs::File::open(wasm)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| format!("cannot read {}: {e}", wasm.display()))?;
    // `\0asm`, then a version and a layer: 1, 0 for a core module; 0x0d, 1 for a component.
    match (n, &head[..4], &head[4..]) {
        (8, b"\0asm", [1, 0, 0, 0]) => Err(
            "this is a core WebAssembly module, not a component: build the plugin with `cargo build --target wasm32-wasip2` (wasm32-wasip1 and wasm32-unknown-unknown give core modules)".into(),
        ),
        (8, b"\0asm", _) => Ok(()),
        _ => Err("this is not a WebAssembly file (no `\\0asm` header): give the `.wasm` a `cargo build --target wasm32-wasip2` of the plugin produces".into()),
    }
}

/// Where a plugin was compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// In a helper process.
    Helper,
    /// In this process.
    InProcess,
}

impl Compiled {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Compiled::Helper => "helper process",
            Compiled::InProcess => "in process",
        }
    }
}

/// The engine settings of a runtime with room for `instances` instances of at most
/// `max_memory` bytes each; a helper process compiles with the very same.
fn config(max_memory: usize, instances: u32) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances)
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_memory_size(max_memory);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        // Plugin memories are small: reserve just enough address space for the largest
        // allowed memory instead of the default 4 GiB per memory.
        .memory_reservation(max_memory as u64)
        .memory_guard_size(64 * 1024)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // For profiling plugins in a running connector: guest functions get their names in
    // `perf report` (wasmtime writes them to /tmp/perf-<pid>.map as it loads code).
    if std::env::var_os(PERFMAP_VAR).is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

/// Set to `1`, names compiled guest code for `perf` (see [`config`]).
pub const PERFMAP_VAR: &str = "SLUICE_PLUGIN_PERFMAP";

/// The WASI interfaces Rust's standard library links into every wasm32-wasip2 component,
/// provided empty: no arguments, no environment, stdin closed, stdout/stderr to the log;
/// plus clocks and random. No filesystem, no sockets.
fn add_wasi(l: &mut Linker<StoreData>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};
    use wasmtime_wasi::WasiView;

    clocks::wall_clock::add_to_linker::<StoreData, WasiClocks>(l, StoreData::clocks)?;
    clocks::monotonic_clock::add_to_linker::<StoreData, WasiClocks>(l, StoreData::clocks)?;
    random::random::add_to_linker::<StoreData, WasiRandom>(l, StoreData::random)?;
    random::insecure::add_to_linker::<StoreData, WasiRandom>(l, StoreData::random)?;
    random::insecure_seed::add_to_linker::<StoreData, WasiRandom>(l, StoreData::random)?;
    cli::exit::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::environment::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::stdin::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::stdout::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::stderr::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::terminal_input::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::terminal_output::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::terminal_stdin::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::terminal_stdout::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    cli::terminal_stderr::add_to_linker::<StoreData, WasiCli>(l, StoreData::cli)?;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<StoreData, Io>(l, |t| {
        t.ctx().table
    })?;
    wasmtime_wasi_io::bindings::wasi::io::poll::add_to_linker::<StoreData, Io>(l, |t| {
        t.ctx().table
    })?;
    wasmtime_wasi_io::bindings::wasi::io::streams::add_to_linker::<StoreData, Io>(l, |t| {
        t.ctx().table
    })?;
    Ok(())
}

/// `HasData` for the `wasi:io` interfaces, which work on the resource table alone.
struct Io;

impl wasmtime::component::HasData for Io {
    type Data<'a> = &'a mut wasmtime::component::ResourceTable;
}

/// Ticks in a row with no guest code running before the ticker sleeps: 100 ms.
const IDLE_TICKS: u32 = 100;

/// Increments the engine's epoch every [`TICK`] on a thread of its own, so that running guest
/// code reaches a yield point even while every async worker is busy.
///
/// The epoch matters only while guest code runs: every entry into a guest holds a
/// [`Running`] for as long as it lasts. After [`IDLE_TICKS`] ticks in a row with none, the
/// thread sleeps until the next entry wakes it, so an idle connector with plugins does not
/// wake a thousand times a second. The check is a sample at each tick: under load, a hundred
/// samples in a row that all miss the calls are rare, and then the next entry wakes the
/// thread with one `unpark`. Otherwise an entry costs one atomic increment and one read.
struct Ticker {
    state: Arc<TickState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct TickState {
    stop: AtomicBool,
    /// Entries into guest code in progress.
    running: AtomicUsize,
    /// Set while the thread sleeps (or is about to) until an entry wakes it.
    asleep: AtomicBool,
    /// Times the thread went to sleep.
    sleeps: AtomicU64,
}

/// Guest code is running (or about to) while this lives: the ticker keeps ticking.
pub(super) struct Running<'a>(&'a TickState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let state = Arc::new(TickState::default());
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                let mut idle = 0;
                while !s.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                    idle = if s.running.load(Ordering::SeqCst) > 0 {
                        0
                    } else {
                        idle + 1
                    };
                    if idle < IDLE_TICKS {
                        continue;
                    }
                    // An entry either counted itself before this check (and the thread keeps
                    // ticking), or sees `asleep` after it and unparks (an unpark before the
                    // park makes the park return at once).
                    s.asleep.store(true, Ordering::SeqCst);
                    if s.running.load(Ordering::SeqCst) == 0 && !s.stop.load(Ordering::SeqCst) {
                        s.sleeps.fetch_add(1, Ordering::Relaxed);
                        std::thread::park();
                    }
                    s.asleep.store(false, Ordering::SeqCst);
                    idle = 0;
                }
            })?;
        Ok(Ticker {
            state,
            thread: Some(thread),
        })
    }

    /// Marks guest code as running until the guard drops, waking the thread if it sleeps.
    fn running(&self) -> Running<'_> {
        self.state.running.fetch_add(1, Ordering::SeqCst);
        if self.state.asleep.load(Ordering::SeqCst) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        Running(&self.state)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A core module exporting `spin`, a function that never returns:
    /// `(module (func (export "spin") (loop (br 0))))`.
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: () -> ()
        0x03, 0x02, 0x01, 0x00, // function section: one function of type 0
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
    ];

    fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_ticker_sleeps_while_no_guest_runs_and_wakes_for_one_that_spins() {
        let rt = Runtime::new(1 << 20, 4).unwrap();
        let sleeps = || rt.ticker.state.sleeps.load(Ordering::Relaxed);
        wait_until(
            "the idle ticker went to sleep",
            Duration::from_secs(10),
            || sleeps() >= 1,
        );

        // Guest code entered while it sleeps is still interrupted at its deadline.
        let (done, result) = std::sync::mpsc::channel();
        let engine = rt.engine.clone();
        let running = rt.clone();
        let spinner = std::thread::spawn(move || {
            let module = wasmtime::Module::new(&engine, SPIN).unwrap();
            let mut store = wasmtime::Store::new(&engine, ());
            store.epoch_deadline_trap();
            store.set_epoch_deadline(2);
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let spin = instance
                .get_typed_func::<(), ()>(&mut store, "spin")
                .unwrap();
            let _running = running.running();
            let _ = done.send(spin.call(&mut store, ()));
        });
        let outcome = result
            .recv_timeout(Duration::from_secs(10))
            .expect("a guest entered while the ticker slept was never interrupted");
        let trap = outcome.unwrap_err();
        assert_eq!(
            trap.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt),
            "{trap:#}"
        );
        spinner.join().unwrap();

        // With nothing running any more, it goes back to sleep.
        let before = sleeps();
        wait_until("the ticker slept again", Duration::from_secs(10), || {
            sleeps() > before
        });
    }
}
