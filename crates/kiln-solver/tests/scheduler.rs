//! Scheduler behaviour, driven through a small in-memory engine whose steps concatenate
//! their inputs' outputs. Each test states one property of the solver.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_oci::Digest;
use kiln_solver::{
    BoxFuture, CacheKey, CacheSource, Engine, EngineError, Event, ExecContext, Graph, Hit,
    InputKey, SolveError, Solver, SolverOptions,
};
use tokio::sync::Barrier;

#[derive(Clone)]
enum Kind {
    /// Output is the name.
    Leaf,
    /// Output is the name followed by the inputs' outputs.
    Join,
    /// Like Join, but keys its single input by the first character of its output only.
    FirstCharOf,
    /// Waits on the shared barrier before finishing.
    Rendezvous,
    /// Fails.
    Fail,
    /// Never finishes on its own; ends when the build is cancelled.
    UntilCancelled,
}

struct Op {
    name: String,
    kind: Kind,
}

#[derive(Default)]
struct MemEngine {
    cache: Mutex<HashMap<CacheKey, String>>,
    runs: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    barrier: Option<Arc<Barrier>>,
    /// The per-key lock is held by someone else for good.
    lock_held_elsewhere: bool,
    /// Keys whose record lost something below its own part (as a layer chain whose lower
    /// blob is gone): `lookup` misses them, but `lookup_on_inputs` rebuilds the result on
    /// the actual inputs.
    own_part_only: Mutex<HashSet<CacheKey>>,
}

impl MemEngine {
    fn runs(&self) -> Vec<String> {
        let mut r = self.runs.lock().unwrap().clone();
        r.sort();
        r
    }
    fn forget_runs(&self) {
        self.runs.lock().unwrap().clear();
    }
}

impl Engine for MemEngine {
    type Op = Op;
    type Output = String;

    fn definition(&self, op: &Op) -> Vec<u8> {
        op.name.as_bytes().to_vec()
    }

    fn input_key(&self, op: &Op, _index: usize) -> InputKey {
        match op.kind {
            Kind::FirstCharOf => InputKey::Content,
            _ => InputKey::Key,
        }
    }

    fn content_digest<'a>(
        &'a self,
        _op: &'a Op,
        _index: usize,
        input: &'a String,
    ) -> BoxFuture<'a, Result<Digest, EngineError>> {
        let first = input.chars().next().unwrap_or('-').to_string();
        Box::pin(async move { Ok(Digest::sha256_of(first.as_bytes())) })
    }

    fn lookup<'a>(
        &'a self,
        key: &'a CacheKey,
        _op: &'a Op,
    ) -> BoxFuture<'a, Result<Option<Hit<String>>, EngineError>> {
        let hit = self.cache.lock().unwrap().get(key).cloned();
        Box::pin(async move {
            Ok(hit.map(|output| Hit {
                output,
                source: CacheSource::Local,
            }))
        })
    }

    fn lookup_on_inputs<'a>(
        &'a self,
        key: &'a CacheKey,
        op: &'a Op,
        inputs: &'a [String],
    ) -> BoxFuture<'a, Result<Option<Hit<String>>, EngineError>> {
        let hit = self.own_part_only.lock().unwrap().contains(key);
        Box::pin(async move {
            Ok(hit.then(|| Hit {
                output: format!("{}({})", op.name, inputs.join(",")),
                source: CacheSource::Remote("rebased".into()),
            }))
        })
    }

    fn lock<'a>(
        &'a self,
        _key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Box<dyn Send + Sync>, EngineError>> {
        let held = self.lock_held_elsewhere;
        Box::pin(async move {
            if held {
                std::future::pending::<()>().await;
            }
            Ok(Box::new(()) as Box<dyn Send + Sync>)
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecContext,
        op: &'a Op,
        inputs: Vec<String>,
    ) -> BoxFuture<'a, Result<String, EngineError>> {
        Box::pin(async move {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            self.runs.lock().unwrap().push(op.name.clone());
            let result = match op.kind {
                Kind::Fail => Err(format!("{} exited with code 2", op.name).into()),
                Kind::UntilCancelled => {
                    ctx.cancel.cancelled().await;
                    Err(format!("{} was stopped", op.name).into())
                }
                Kind::Rendezvous => {
                    self.barrier.as_ref().expect("barrier").wait().await;
                    Ok(op.name.clone())
                }
                _ => {
                    // Yield so concurrently runnable steps interleave.
                    tokio::task::yield_now().await;
                    Ok(format!("{}({})", op.name, inputs.join(",")))
                }
            };
            self.running.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }

    fn record<'a>(
        &'a self,
        key: &'a CacheKey,
        _op: &'a Op,
        output: &'a String,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.cache
            .lock()
            .unwrap()
            .insert(key.clone(), output.clone());
        Box::pin(async { Ok(()) })
    }

    fn describe(&self, op: &Op) -> String {
        format!("[{}]", op.name)
    }
}

fn op(name: &str, kind: Kind) -> Op {
    Op {
        name: name.to_owned(),
        kind,
    }
}

/// base ─┬─ deps-a ─┐
///       ├─ deps-b ─┼─ app ── test
///       └─ src ────┘
fn pipeline(src_name: &str) -> (Graph<Op>, usize) {
    let mut g = Graph::new();
    let base = g.add(op("base", Kind::Leaf), vec![]).unwrap();
    let a = g.add(op("deps-a", Kind::Join), vec![base]).unwrap();
    let b = g.add(op("deps-b", Kind::Join), vec![base]).unwrap();
    let src = g.add(op(src_name, Kind::Leaf), vec![]).unwrap();
    let app = g.add(op("app", Kind::Join), vec![a, b, src]).unwrap();
    let test = g.add(op("test", Kind::Join), vec![app]).unwrap();
    (g, test)
}

fn solver(engine: &Arc<MemEngine>, g: Graph<Op>, options: SolverOptions) -> Solver<MemEngine> {
    Solver::new(engine.clone(), g, options, Arc::new(|_e: Event| {}))
}

#[tokio::test]
async fn first_solve_runs_every_step_once() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    let out = solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    assert_eq!(out, "test(app(deps-a(base()),deps-b(base()),src-v1()))");
    assert_eq!(
        engine.runs(),
        ["app", "base", "deps-a", "deps-b", "src-v1", "test"]
    );
}

#[tokio::test]
async fn unchanged_rebuild_runs_nothing_and_never_touches_inputs() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    let first = solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    engine.forget_runs();
    // Drop every record but the final one: a hit on it must not need anything below it.
    let final_key = solver(&engine, pipeline("src-v1").0, SolverOptions::default())
        .key(test)
        .await
        .unwrap();
    engine.cache.lock().unwrap().retain(|k, _| *k == final_key);
    let (g, test) = pipeline("src-v1");
    let again = solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert!(engine.runs().is_empty(), "ran {:?}", engine.runs());
}

#[tokio::test]
async fn changing_one_source_reruns_only_its_dependents() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    engine.forget_runs();
    let (g, test) = pipeline("src-v2");
    let out = solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    assert_eq!(out, "test(app(deps-a(base()),deps-b(base()),src-v2()))");
    assert_eq!(engine.runs(), ["app", "src-v2", "test"]);
}

#[tokio::test]
async fn independent_steps_run_at_the_same_time() {
    let barrier = Arc::new(Barrier::new(3));
    let engine = Arc::new(MemEngine {
        barrier: Some(barrier),
        ..Default::default()
    });
    let mut g = Graph::new();
    let a = g.add(op("a", Kind::Rendezvous), vec![]).unwrap();
    let b = g.add(op("b", Kind::Rendezvous), vec![]).unwrap();
    let c = g.add(op("c", Kind::Rendezvous), vec![]).unwrap();
    let all = g.add(op("all", Kind::Join), vec![a, b, c]).unwrap();
    // Each of a, b, c waits until all three are running: run one at a time, it would hang.
    let solve = solver(&engine, g, SolverOptions::default());
    let out = tokio::time::timeout(Duration::from_secs(30), solve.solve(all))
        .await
        .expect("independent steps did not run concurrently")
        .unwrap();
    assert_eq!(out, "all(a,b,c)");
    assert_eq!(engine.max_running.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn max_parallelism_bounds_running_steps() {
    let engine = Arc::new(MemEngine::default());
    let mut g = Graph::new();
    let leaves: Vec<_> = (0..8)
        .map(|i| g.add(op(&format!("leaf{i}"), Kind::Leaf), vec![]).unwrap())
        .collect();
    let all = g.add(op("all", Kind::Join), leaves).unwrap();
    let options = SolverOptions {
        max_parallelism: Some(2),
        ..Default::default()
    };
    solver(&engine, g, options).solve(all).await.unwrap();
    assert_eq!(engine.runs().len(), 9);
    assert!(engine.max_running.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn identical_steps_in_one_build_run_once() {
    let engine = Arc::new(MemEngine::default());
    let mut g = Graph::new();
    let base1 = g.add(op("base", Kind::Leaf), vec![]).unwrap();
    let base2 = g.add(op("base", Kind::Leaf), vec![]).unwrap();
    let x = g.add(op("install", Kind::Join), vec![base1]).unwrap();
    let y = g.add(op("install", Kind::Join), vec![base2]).unwrap();
    let both = g.add(op("both", Kind::Join), vec![x, y]).unwrap();
    let out = solver(&engine, g, SolverOptions::default())
        .solve(both)
        .await
        .unwrap();
    assert_eq!(out, "both(install(base()),install(base()))");
    assert_eq!(engine.runs(), ["base", "both", "install"]);
}

#[tokio::test]
async fn no_cache_nodes_run_even_when_cached() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    engine.forget_runs();
    let (g, test) = pipeline("src-v1");
    // deps-a (node 1), app (4) and test are marked: they rerun, their other inputs still hit.
    let options = SolverOptions {
        no_cache: HashSet::from([1, 4, test]),
        ..Default::default()
    };
    solver(&engine, g, options).solve(test).await.unwrap();
    assert_eq!(engine.runs(), ["app", "deps-a", "test"]);
    engine.forget_runs();
    // A marked step whose dependent is a hit is not needed at all, so it does not run.
    let (g, test) = pipeline("src-v1");
    let options = SolverOptions {
        no_cache: HashSet::from([1]),
        ..Default::default()
    };
    solver(&engine, g, options).solve(test).await.unwrap();
    assert!(engine.runs().is_empty(), "ran {:?}", engine.runs());
}

#[tokio::test]
async fn content_keyed_input_reruns_only_when_selected_content_changes() {
    let engine = Arc::new(MemEngine::default());
    let build = |src: &str| {
        let mut g = Graph::new();
        let ctx = g.add(op(src, Kind::Leaf), vec![]).unwrap();
        let sel = g
            .add(op("copy-first-char", Kind::FirstCharOf), vec![ctx])
            .unwrap();
        (g, sel)
    };
    let (g, n) = build("lock-v1");
    solver(&engine, g, SolverOptions::default())
        .solve(n)
        .await
        .unwrap();
    engine.forget_runs();
    // Same first character: the copy's key is unchanged, only the source itself runs.
    let (g, n) = build("lock-v2");
    let out = solver(&engine, g, SolverOptions::default())
        .solve(n)
        .await
        .unwrap();
    assert_eq!(out, "copy-first-char(lock-v1())");
    assert_eq!(engine.runs(), ["lock-v2"]);
    engine.forget_runs();
    let (g, n) = build("other");
    solver(&engine, g, SolverOptions::default())
        .solve(n)
        .await
        .unwrap();
    assert_eq!(engine.runs(), ["copy-first-char", "other"]);
}

#[tokio::test]
async fn a_failing_step_is_named_and_its_dependents_never_run() {
    let engine = Arc::new(MemEngine::default());
    let mut g = Graph::new();
    let base = g.add(op("base", Kind::Leaf), vec![]).unwrap();
    let bad = g.add(op("make", Kind::Fail), vec![base]).unwrap();
    let after = g.add(op("after", Kind::Join), vec![bad]).unwrap();
    let err = solver(&engine, g, SolverOptions::default())
        .solve(after)
        .await
        .unwrap_err();
    match &err {
        SolveError::Step {
            node,
            step,
            message,
        } => {
            assert_eq!(*node, bad);
            assert_eq!(step, "[make]");
            assert_eq!(message, "make exited with code 2");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(engine.runs(), ["base", "make"]);
    // A failed step records nothing.
    assert_eq!(engine.cache.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_solve_stops_running_siblings_and_lets_go_of_the_engine() {
    let engine = Arc::new(MemEngine::default());
    let mut g = Graph::new();
    let base = g.add(op("base", Kind::Leaf), vec![]).unwrap();
    let long = g.add(op("long", Kind::UntilCancelled), vec![base]).unwrap();
    // One step more on the failing side, so the long step is surely running when it fails.
    let mid = g.add(op("mid", Kind::Join), vec![base]).unwrap();
    let bad = g.add(op("make", Kind::Fail), vec![mid]).unwrap();
    let after = g.add(op("after", Kind::Join), vec![long, bad]).unwrap();
    let s = solver(&engine, g, SolverOptions::default());
    let token = s.cancel_token();
    let err = s.solve(after).await.unwrap_err();
    assert!(
        matches!(err, SolveError::Step { node, .. } if node == bad),
        "{err:?}"
    );
    assert!(engine.runs().contains(&"long".to_owned()));
    // The sibling still running is told to stop...
    assert!(token.is_cancelled());
    // ...and once the solver is gone nothing holds the engine (nor the lease an engine
    // keeps): the abandoned computation was dropped, not left holding the solver's state.
    drop(s);
    assert_eq!(Arc::strong_count(&engine), 1);
}

#[tokio::test]
async fn a_step_waiting_for_another_process_to_finish_its_key_gives_up_when_cancelled() {
    let engine = Arc::new(MemEngine {
        lock_held_elsewhere: true,
        ..MemEngine::default()
    });
    let (g, test) = pipeline("src-v1");
    let s = solver(&engine, g, SolverOptions::default());
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { s.solve(test).await }
    });
    tokio::task::yield_now().await;
    s.cancel();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, SolveError::Cancelled), "{err:?}");
    assert!(engine.runs().is_empty(), "ran {:?}", engine.runs());
}

#[tokio::test]
async fn a_solve_cancelled_while_finding_cache_hits_is_not_a_success() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    let (g, test) = pipeline("src-v1");
    let s = solver(&engine, g, SolverOptions::default());
    s.cancel();
    let err = s.solve(test).await.unwrap_err();
    assert!(matches!(err, SolveError::Cancelled), "{err:?}");
}

#[tokio::test]
async fn cancelled_solve_starts_nothing_new() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    let s = solver(&engine, g, SolverOptions::default());
    s.cancel();
    let err = s.solve(test).await.unwrap_err();
    assert!(matches!(err, SolveError::Cancelled), "{err:?}");
    assert!(engine.runs().is_empty(), "ran {:?}", engine.runs());
}

#[tokio::test]
async fn events_report_cached_and_completed_steps() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let (g, test) = pipeline("src-v2");
    let s = Solver::new(
        engine.clone(),
        g,
        SolverOptions::default(),
        Arc::new(move |e: Event| {
            let tag = match e {
                Event::Cached { node, .. } => format!("cached {node}"),
                Event::Started { node, .. } => format!("started {node}"),
                Event::Completed { node, .. } => format!("done {node}"),
                Event::Log { .. } | Event::Failed { .. } => return,
            };
            sink.lock().unwrap().push(tag);
        }),
    );
    s.solve(test).await.unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            "cached 1",
            "cached 2",
            "done 3",
            "done 4",
            "done 5",
            "started 3",
            "started 4",
            "started 5"
        ]
    );
}

#[tokio::test]
async fn a_lost_record_in_the_middle_reruns_that_step_only() {
    let engine = Arc::new(MemEngine::default());
    let (g, test) = pipeline("src-v1");
    let first = solver(&engine, g, SolverOptions::default())
        .solve(test)
        .await
        .unwrap();
    engine.forget_runs();
    // `app`'s own result is lost; `test`'s record includes it, so its plain lookup misses
    // too, but its own part survives.
    let s = solver(&engine, pipeline("src-v1").0, SolverOptions::default());
    let app_key = s.key(test - 1).await.unwrap();
    let test_key = s.key(test).await.unwrap();
    engine
        .cache
        .lock()
        .unwrap()
        .retain(|k, _| *k != app_key && *k != test_key);
    engine.own_part_only.lock().unwrap().insert(test_key);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let (g, test) = pipeline("src-v1");
    let again = Solver::new(
        engine.clone(),
        g,
        SolverOptions::default(),
        Arc::new(move |e: Event| {
            if let Event::Cached { node, source, .. } = e {
                sink.lock().unwrap().push((node, source.to_string()));
            }
        }),
    )
    .solve(test)
    .await
    .unwrap();
    assert_eq!(again, first);
    assert_eq!(engine.runs(), ["app"]);
    assert!(
        seen.lock().unwrap().contains(&(test, "rebased".to_owned())),
        "{:?}",
        seen.lock().unwrap()
    );
}

#[test]
fn graph_rejects_forward_references() {
    let mut g: Graph<Op> = Graph::new();
    let err = g.add(op("x", Kind::Leaf), vec![0]).unwrap_err();
    assert!(matches!(err, SolveError::BadGraph { node: 0, input: 0 }));
}
