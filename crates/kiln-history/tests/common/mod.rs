//! Synthetic build records for tests and the docs example: the examples/ build (its stages and
//! steps, plausible durations) and a large generated one, scheduled by a small list scheduler
//! so waits and parallelism look like a real build's.
#![allow(dead_code)]

use std::collections::BTreeMap;

use kiln_history::{
    BuildRecord, BuildStatus, CacheResult, Span, SpanKind, StepRecord, RECORD_VERSION,
};

/// A step to schedule.
pub struct Planned {
    pub description: String,
    pub stage: String,
    pub depends_on: Vec<usize>,
    pub duration_ms: u64,
    pub inputs: BTreeMap<String, String>,
}

fn planned(desc: &str, stage: &str, deps: &[usize], ms: u64, inputs: &[(&str, &str)]) -> Planned {
    Planned {
        description: desc.to_string(),
        stage: stage.to_string(),
        depends_on: deps.to_vec(),
        duration_ms: ms,
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Fake but stable cache key: hash of the step's inputs and its deps' keys.
fn key_of(p: &Planned, dep_keys: &[String]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.description.hash(&mut h);
    p.inputs.hash(&mut h);
    dep_keys.hash(&mut h);
    format!("sha256:{:016x}{:048x}", h.finish(), 0)
}

/// Schedules `plan` with `slots` parallel slots: a step whose key is in `cached_keys` is a
/// cache hit (found 3 ms after its deps' keys); the others run as soon as deps and a slot allow.
pub fn simulate(
    id: &str,
    target: &str,
    plan: &[Planned],
    cached_keys: &[String],
    remote: Option<&str>,
    slots: usize,
    spans: Vec<Span>,
) -> BuildRecord {
    let mut keys: Vec<String> = Vec::new();
    for p in plan {
        let dep_keys: Vec<String> = p.depends_on.iter().map(|d| keys[*d].clone()).collect();
        keys.push(key_of(p, &dep_keys));
    }
    let offset = spans
        .iter()
        .filter(|s| s.kind == SpanKind::CacheImport || s.kind == SpanKind::Context)
        .map(|s| s.end_ms)
        .max()
        .unwrap_or(0);
    let mut end: Vec<u64> = vec![0; plan.len()];
    let mut steps = Vec::new();
    let mut slot_free: Vec<u64> = vec![offset; slots.max(1)];
    for (i, p) in plan.iter().enumerate() {
        let ready = p.depends_on.iter().map(|d| end[*d]).max().unwrap_or(offset);
        let cached = cached_keys.contains(&keys[i]);
        let (cache, start, stop) = if cached {
            let c = match remote {
                Some(r) => CacheResult::CachedRemote(r.to_string()),
                None => CacheResult::CachedLocal,
            };
            (c, None, ready + 3)
        } else {
            let (slot, free) = slot_free
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, f)| *f)
                .unwrap_or((0, 0));
            let start = ready.max(free);
            slot_free[slot] = start + p.duration_ms;
            (CacheResult::Run, Some(start), start + p.duration_ms)
        };
        end[i] = stop;
        steps.push(StepRecord {
            index: i,
            description: p.description.clone(),
            stage: p.stage.clone(),
            depends_on: p.depends_on.clone(),
            cache,
            cache_key: Some(keys[i].clone()),
            start_ms: start,
            end_ms: Some(stop),
            inputs: p.inputs.clone(),
            error: None,
        });
    }
    let last = end
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(spans.iter().map(|s| s.end_ms).max().unwrap_or(0));
    let started_at = 1_790_000_000_000;
    BuildRecord {
        version: RECORD_VERSION,
        id: id.to_string(),
        target: target.to_string(),
        argv: vec![
            "kiln".into(),
            "build".into(),
            ".".into(),
            "--target".into(),
            target.into(),
        ],
        options: BTreeMap::new(),
        started_at,
        ended_at: started_at + last + 40,
        status: BuildStatus::Succeeded,
        error: None,
        image_digest: Some(format!("sha256:{:064x}", 0xabcdefu64)),
        bytes_downloaded: spans
            .iter()
            .filter(|s| s.kind == SpanKind::Pull)
            .map(|s| s.bytes)
            .sum(),
        bytes_uploaded: spans
            .iter()
            .filter(|s| s.kind == SpanKind::Push || s.kind == SpanKind::CacheExport)
            .map(|s| s.bytes)
            .sum(),
        steps,
        spans,
    }
}

/// The examples/ Dockerfile's `release` target, as steps. `controller` is the digest of
/// src/Controller.php, `version` the APP_VERSION build arg.
pub fn example_plan(controller: &str, version: &str) -> Vec<Planned> {
    let base = ("base", "sha256:1b0c...busybox");
    vec![
        planned(
            "[internal] load metadata for busybox:latest",
            "",
            &[],
            120,
            &[base],
        ),
        // composer-deps
        planned(
            "[composer-deps 1/3] WORKDIR /deps",
            "composer-deps",
            &[0],
            15,
            &[("cmd", "mkdir /deps")],
        ),
        planned(
            "[composer-deps 2/3] COPY composer.json composer.lock ./",
            "composer-deps",
            &[1],
            40,
            &[
                ("file:composer.json", "sha256:c1"),
                ("file:composer.lock", "sha256:c2"),
            ],
        ),
        planned(
            "[composer-deps 3/3] RUN composer install (busybox loop)",
            "composer-deps",
            &[2],
            2600,
            &[("cmd", "for pkg in ...")],
        ),
        // npm-deps
        planned(
            "[npm-deps 1/5] WORKDIR /deps",
            "npm-deps",
            &[0],
            15,
            &[("cmd", "mkdir /deps")],
        ),
        planned(
            "[npm-deps 2/5] COPY package.json package-lock.json ./",
            "npm-deps",
            &[4],
            35,
            &[
                ("file:package.json", "sha256:n1"),
                ("file:package-lock.json", "sha256:n2"),
            ],
        ),
        planned(
            "[npm-deps 3/5] RUN npm ci (busybox loop)",
            "npm-deps",
            &[5],
            3100,
            &[("arg:NODE_ENV", "production")],
        ),
        planned(
            "[npm-deps 4/5] COPY assets/ ./assets/",
            "npm-deps",
            &[6],
            30,
            &[("file:assets/app.js", "sha256:a1")],
        ),
        planned(
            "[npm-deps 5/5] RUN bundle public/app.js",
            "npm-deps",
            &[7],
            420,
            &[("arg:NODE_ENV", "production")],
        ),
        // php-ext
        planned(
            "[php-ext 1/3] WORKDIR /build",
            "php-ext",
            &[0],
            15,
            &[("cmd", "mkdir /build")],
        ),
        planned(
            "[php-ext 2/3] COPY ext/ ./ext/",
            "php-ext",
            &[9],
            25,
            &[("file:ext/kiln.c", "sha256:e1")],
        ),
        planned(
            "[php-ext 3/3] RUN compile modules/kiln.so",
            "php-ext",
            &[10],
            4200,
            &[("arg:PHP_VERSION", "8.3")],
        ),
        // app
        planned(
            "[app 1/7] WORKDIR /srv/app",
            "app",
            &[0],
            15,
            &[("cmd", "mkdir /srv/app")],
        ),
        planned(
            "[app 2/7] COPY --from=composer-deps /deps/vendor ./vendor",
            "app",
            &[12, 3],
            380,
            &[],
        ),
        planned(
            "[app 3/7] COPY --from=npm-deps /deps/public ./public",
            "app",
            &[13, 8],
            60,
            &[],
        ),
        planned(
            "[app 4/7] COPY --from=php-ext /build/modules/ /usr/local/lib/php/extensions/",
            "app",
            &[14, 11],
            30,
            &[],
        ),
        planned(
            "[app 5/7] COPY src/ ./src/",
            "app",
            &[15],
            90,
            &[
                ("file:src/Controller.php", controller),
                ("file:src/Router.php", "sha256:r1"),
                ("file:src/index.php", "sha256:i1"),
            ],
        ),
        planned(
            "[app 6/7] COPY bin/ ./bin/",
            "app",
            &[16],
            20,
            &[("file:bin/start", "sha256:b1")],
        ),
        planned(
            "[app 7/7] RUN echo \"$APP_VERSION\" > VERSION && find . -type f | wc -l > FILES",
            "app",
            &[17],
            650,
            &[("arg:APP_VERSION", version)],
        ),
    ]
}

/// Spans of a build that pulls busybox, pushes the image and exports its cache.
pub fn example_spans(total_guess: u64, pulled: bool) -> Vec<Span> {
    let mut spans = vec![Span {
        kind: SpanKind::Context,
        name: "context .".into(),
        start_ms: 0,
        end_ms: 60,
        bytes: 182_000,
    }];
    if pulled {
        spans.push(Span {
            kind: SpanKind::Pull,
            name: "busybox:latest".into(),
            start_ms: 10,
            end_ms: 110,
            bytes: 1_081_344,
        });
    }
    let t = total_guess;
    spans.extend([
        Span {
            kind: SpanKind::Compress,
            name: "layer app 5/7".into(),
            start_ms: t,
            end_ms: t + 180,
            bytes: 2_400_000,
        },
        Span {
            kind: SpanKind::Push,
            name: "reg.local:5000/app:release".into(),
            start_ms: t + 180,
            end_ms: t + 420,
            bytes: 2_400_000,
        },
        Span {
            kind: SpanKind::CacheExport,
            name: "reg.local:5000/app:buildcache".into(),
            start_ms: t + 190,
            end_ms: t + 520,
            bytes: 7_900_000,
        },
    ]);
    spans
}

/// Cold build of the example.
pub fn example_cold() -> BuildRecord {
    let plan = example_plan("sha256:aaa111controller", "1.0.0");
    simulate(
        "0199aa0000000001",
        "release",
        &plan,
        &[],
        None,
        2,
        example_spans(7000, true),
    )
}

/// The example rebuilt after `mutate` changed the plan (e.g. an edited source file), with the
/// cold build's keys in the local cache.
pub fn example_rebuild(id: &str, controller: &str, version: &str) -> BuildRecord {
    let cold_plan = example_plan("sha256:aaa111controller", "1.0.0");
    let cold = simulate("x", "release", &cold_plan, &[], None, 2, vec![]);
    let keys: Vec<String> = cold
        .steps
        .iter()
        .filter_map(|s| s.cache_key.clone())
        .collect();
    let plan = example_plan(controller, version);
    simulate(
        id,
        "release",
        &plan,
        &keys,
        None,
        2,
        example_spans(1200, false),
    )
}

/// A generated build of `n` steps in `n / 25` stages: each stage starts from the base or from
/// an earlier stage and copies from up to two others; every third stage cached if `warm`.
pub fn large_build(id: &str, n: usize, warm: bool) -> BuildRecord {
    let per_stage = 25;
    let mut plan = vec![planned(
        "[internal] load metadata for busybox:latest",
        "",
        &[],
        150,
        &[("base", "sha256:b")],
    )];
    let mut stage_last: Vec<usize> = Vec::new();
    let stages = (n.saturating_sub(1)).div_ceil(per_stage);
    for s in 0..stages {
        let name = format!("stage-{s:02}");
        let mut prev = if s > 0 && s % 4 == 0 {
            stage_last[s - 1]
        } else {
            0
        };
        for k in 0..per_stage {
            if plan.len() >= n {
                break;
            }
            let mut deps = vec![prev];
            if k == 3 && s >= 2 {
                deps.push(stage_last[s - 2]);
            }
            // Deterministic durations between 20 ms and ~9 s.
            let ms = 20 + ((s * 7919 + k * 104_729) % 97) as u64 * ((k % 5) as u64 * 20 + 1);
            let desc = if k % 3 == 0 {
                format!("[{name} {}/{per_stage}] COPY src/module{k}/ ./m{k}/", k + 1)
            } else {
                format!(
                    "[{name} {}/{per_stage}] RUN make -C m{k} -j2 target-{k}",
                    k + 1
                )
            };
            let file = format!("file:src/module{k}/lib.c");
            plan.push(planned(&desc, &name, &deps, ms, &[(&file, "sha256:f")]));
            prev = plan.len() - 1;
        }
        stage_last.push(prev);
    }
    let cached: Vec<String> = if warm {
        let cold = simulate("x", "all", &plan, &[], None, 2, vec![]);
        cold.steps
            .iter()
            .filter(|s| {
                s.stage
                    .trim_start_matches("stage-")
                    .parse::<usize>()
                    .map(|v| v % 3 == 0)
                    .unwrap_or(false)
            })
            .filter_map(|s| s.cache_key.clone())
            .collect()
    } else {
        Vec::new()
    };
    let mut spans = vec![Span {
        kind: SpanKind::Pull,
        name: "busybox:latest".into(),
        start_ms: 0,
        end_ms: 140,
        bytes: 1_081_344,
    }];
    for i in 0..40u64 {
        spans.push(Span {
            kind: SpanKind::Compress,
            name: format!("sha256:{i:04x}layer"),
            start_ms: 60_000 + i * 300,
            end_ms: 60_000 + i * 300 + 250,
            bytes: 1_000_000 + i * 9000,
        });
        spans.push(Span {
            kind: SpanKind::Push,
            name: format!("sha256:{i:04x}layer"),
            start_ms: 60_250 + i * 300,
            end_ms: 60_250 + i * 300 + 400,
            bytes: 1_000_000 + i * 9000,
        });
    }
    simulate(
        id,
        "all",
        &plan,
        &cached,
        Some("reg.local:5000/big:cache"),
        2,
        spans,
    )
}
