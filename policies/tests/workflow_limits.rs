//! Issue 12, item 6: the bounds on workflow definitions and CEL expressions — each hostile
//! shape is refused at registration with a message naming the bound, quickly, without
//! overflowing the stack; evaluation is bounded by its input; validation stays linear.

use std::path::Path;
use std::time::{Duration, Instant};

use meshflow_policies::workflow::*;
use serde_json::json;

fn definition(steps: &str) -> String {
    format!("apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: {{ name: w }}\nspec:\n  steps:\n{steps}")
}

/// Registers a definition whose first step has `when: <expr>` (quoted for YAML).
fn with_when(expr: &str) -> Result<Workflow, String> {
    let quoted = serde_json::to_string(expr).unwrap();
    Workflow::parse(
        Path::new("w.yaml"),
        &definition(&format!(
            "  - {{ name: a, when: {quoted}, sleep: {{ duration: 1s }} }}\n"
        )),
    )
    .map_err(|e| e.to_string())
}

/// `[0, …, 9].<macro>(v0, [0, …, 9].<macro>(v1, …))`, `depth` deep.
fn nested(macro_name: &str, depth: usize) -> String {
    let mut inner = (0..depth)
        .map(|i| format!("v{i}"))
        .collect::<Vec<_>>()
        .join(" + ");
    if macro_name != "map" {
        inner.push_str(" >= 0");
    }
    for i in (0..depth).rev() {
        inner = format!("[0,1,2,3,4,5,6,7,8,9].{macro_name}(v{i}, {inner})");
    }
    if macro_name == "map" {
        inner.push_str(".size() > 0");
    }
    inner
}

/// Runs `f` on a thread with a `kb` KiB stack (a stack overflow aborts the test process).
fn on_stack<T: Send + 'static>(kb: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(kb * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn hostile_expressions_are_refused_at_registration_naming_the_bound() {
    let terms = |n: usize, sep: &str| vec!["1"; n].join(sep);
    let cases: Vec<(String, String)> = vec![
        (
            format!("{}true{}", "(".repeat(300), ")".repeat(300)),
            format!("nests brackets more than {MAX_EXPRESSION_NESTING} deep"),
        ),
        (
            format!("{}1{} > 0", "[".repeat(40), "]".repeat(40)),
            "nests brackets".into(),
        ),
        (
            format!("{} > 0", terms(4000, " + ")),
            format!("at most {MAX_EXPRESSION_BYTES} are allowed"),
        ),
        (
            format!("{} > 0", terms(600, "+")),
            format!("more than {MAX_EXPRESSION_TOKENS} tokens"),
        ),
        // Under the token bound, but operators chain deeper than the AST bound.
        (
            format!("{} > 0", terms(100, "+")),
            format!("nests more than {MAX_AST_DEPTH} operations deep"),
        ),
        (
            format!("input{} == 1", ".a".repeat(100)),
            format!("nests more than {MAX_AST_DEPTH} operations deep"),
        ),
        (
            nested("all", 8),
            format!("nest more than {MAX_COMPREHENSION_NESTING} deep"),
        ),
        (
            nested("map", 7),
            format!("nest more than {MAX_COMPREHENSION_NESTING} deep"),
        ),
        (
            nested("exists", 3),
            format!("nest more than {MAX_COMPREHENSION_NESTING} deep"),
        ),
    ];
    for (expr, expected) in cases {
        let started = Instant::now();
        // Half of a blocking thread's default stack (2 MiB), where the coordinator validates.
        let e = on_stack(1024, move || with_when(&expr)).unwrap_err();
        assert!(e.contains(&expected), "{e}");
        assert!(e.contains("spec.steps[0].when"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1), "{e}");
    }
    // Two comprehensions may nest, and ranges may be chained (that adds, not multiplies).
    with_when(&nested("all", 2)).unwrap();
    with_when("input.items.map(x, x.qty).filter(q, q > 0).all(q, q < 100)").unwrap();
    // Long messages quote the expression shortened.
    let e = with_when(&format!("{} > 0", terms(600, "+"))).unwrap_err();
    assert!(e.len() < 400, "{e}");
}

#[test]
fn the_lexical_scan_reads_strings_and_comments_as_cel_does() {
    let deep = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
    // Brackets inside strings, raw strings, bytes and comments do not nest.
    with_when(&format!("\"{}\" != input.x", "(".repeat(100))).unwrap();
    with_when(&format!("r'{}' != input.x", ")".repeat(100))).unwrap();
    with_when(&format!("b\"\"\"{}\"\"\" != input.x", "[".repeat(100))).unwrap();
    with_when(&format!("input.x != 1 // {}\n", "(".repeat(100))).unwrap();
    with_when("'\\'((((((((((((((((((((((((((((' != input.x").unwrap();
    // Nothing can hide real brackets from the scan: a raw string ends at its quote (its
    // backslash escapes nothing), an unknown escape or an unterminated string is refused
    // before the parser (which would recover and keep parsing) sees it.
    let e = with_when(&format!("r\"\\\" + {} + \"\" == 1", deep(40))).unwrap_err();
    assert!(e.contains("nests brackets"), "{e}");
    let e = with_when(&format!("\"\\q\" + \"{}\" == 1", ")".repeat(40))).unwrap_err();
    assert!(e.contains("invalid escape"), "{e}");
    let e = with_when(&format!("\"abc + {}", deep(40))).unwrap_err();
    assert!(e.contains("unterminated string"), "{e}");
    let e = with_when(&format!("'a\n' + {}", deep(40))).unwrap_err();
    assert!(e.contains("unterminated string"), "{e}");
    let e = with_when("input.x # 1").unwrap_err();
    assert!(e.contains("unexpected character"), "{e}");
    // `// "` is a comment, not a string: the brackets after it count.
    let e = with_when(&format!("1 == 1 // \"\n + {} + \"\" == 1", deep(40))).unwrap_err();
    assert!(e.contains("nests brackets"), "{e}");
}

/// Every shape at the bounds parses, checks and evaluates on a thread with half the stack
/// of a Tokio blocking thread (debug build: the worst is about 4× slacker than that).
#[test]
fn expressions_at_every_bound_fit_half_a_blocking_thread_stack() {
    let n = MAX_EXPRESSION_NESTING;
    let t = MAX_EXPRESSION_TOKENS;
    let cases = vec![
        format!("{}1{}", "(".repeat(n), ")".repeat(n)),
        format!("{}1{}", "[".repeat(n), "]".repeat(n)),
        format!("{}1{}", "{1:".repeat(n), "}".repeat(n)),
        format!("{}1{}", "size(".repeat(n), ")".repeat(n)),
        format!("{}1{}", "(true ? ".repeat(n), " : 1)".repeat(n)),
        format!("{}1", "true ? 1 : ".repeat((t - 1) / 4)),
        format!("{}true", "!".repeat(t - 1)),
        format!("{}1", "-".repeat(t - 1)),
        vec!["true"; t / 2].join("&&"),
        vec!["1"; t / 2].join("+"),
        vec!["1"; t / 2].join("<"),
        format!("input{}", ".a".repeat((t - 1) / 2)),
        format!("input{}", "[0]".repeat((t - 1) / 3)),
        format!(
            "{}{}1{}",
            "{1:".repeat(n),
            "true ? 1 : ".repeat((t - 4 * n - 1) / 4),
            "}".repeat(n)
        ),
        format!(
            "{}{}true{}",
            "{1:".repeat(n),
            "!".repeat(t - 4 * n - 1),
            "}".repeat(n)
        ),
        format!(
            "{}{}{}",
            "(".repeat(n),
            vec!["1"; (t - 2 * n) / 2].join("+"),
            ")".repeat(n)
        ),
        nested("all", 2),
    ];
    for source in cases {
        on_stack(1024, move || {
            let ctx = json!({"input": {"a": 1}});
            // Refused or evaluated, never a crash.
            let _ = evaluate(&source, &ctx);
            let _ = with_when(&source);
        });
    }
}

#[test]
fn evaluation_cost_is_bounded_by_the_input() {
    let items = |n: usize| json!({"input": {"items": (0..n).collect::<Vec<_>>()}});
    // Cheap over small input.
    assert!(evaluate_condition("input.items.all(x, x >= 0)", &items(1000)).unwrap());
    assert_eq!(
        evaluate("input.items.map(x, x * 2)", &items(500)).unwrap()[499],
        json!(998)
    );
    assert!(evaluate_condition(
        "input.items.all(x, input.items.exists(y, y == x))",
        &items(300)
    )
    .unwrap());
    // Refused, quickly, before running, over large input: nested comprehensions multiply,
    // `map`/`filter` grow their list quadratically, one pass is linear.
    for (source, n) in [
        ("input.items.all(x, input.items.exists(y, y == x))", 20_000),
        ("input.items.map(x, x).size() > 0", 20_000),
        ("input.items.filter(x, x > 0).size() > 0", 20_000),
        ("input.items.all(x, x >= 0)", 1_000_000),
        (
            "[input.items, input.items].all(l, l.all(x, x >= 0))",
            200_000,
        ),
    ] {
        let ctx = items(n);
        let started = Instant::now();
        let e = evaluate(source, &ctx).unwrap_err();
        assert!(e.message.contains("too costly"), "{source}: {e}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{source}: {:?}",
            started.elapsed()
        );
    }
    // Strings count by their length: copying a large one per element is refused.
    let ctx = json!({"input": {"items": (0..100).collect::<Vec<_>>(), "s": "x".repeat(100_000)}});
    let e = evaluate("input.items.map(x, input.s + input.s).size() > 0", &ctx).unwrap_err();
    assert!(e.message.contains("too costly"), "{e}");
    // The interpreter panics (`todo!`) over some input: an error, not a crash.
    let e = evaluate("input.n.all(x, x > 0)", &json!({"input": {"n": 5}})).unwrap_err();
    assert!(e.message.contains("cannot be evaluated"), "{e}");
}

#[test]
fn step_count_is_bounded_and_validation_is_linear() {
    let call = "call: { service: s, path: /x }";
    let chain = |n: usize, template: bool| -> String {
        (0..n)
            .map(|i| match i {
                0 => format!("  - {{ name: s0, {call} }}\n"),
                _ if template => format!(
                    "  - {{ name: s{i}, dependsOn: [s{}], call: {{ service: s, path: \"/x/${{steps.s0.output.id}}\" }} }}\n",
                    i - 1
                ),
                _ => format!("  - {{ name: s{i}, dependsOn: [s{}], {call} }}\n", i - 1),
            })
            .collect()
    };
    let started = Instant::now();
    let e = Workflow::parse(Path::new("w.yaml"), &definition(&chain(10_000, false)))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("at most {MAX_STEPS}")), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The largest chain allowed, each step reading the first one (upstream through all the
    // others): validated in well under a second, without recursion.
    let started = Instant::now();
    let text = definition(&chain(MAX_STEPS, true));
    on_stack(1024, move || {
        Workflow::parse(Path::new("w.yaml"), &text).unwrap()
    });
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A long cycle is named without recursion.
    let mut cyclic = chain(MAX_STEPS, false);
    cyclic = cyclic.replacen(
        "name: s0,",
        &format!("name: s0, dependsOn: [s{}],", MAX_STEPS - 1),
        1,
    );
    let e = on_stack(1024, move || {
        Workflow::parse(Path::new("w.yaml"), &definition(&cyclic))
            .unwrap_err()
            .to_string()
    });
    assert!(
        e.contains("dependsOn cycle: s0 → s999 → s998"),
        "{}",
        &e[..200.min(e.len())]
    );
    // A step that reads one not upstream of it is still named.
    let e = Workflow::parse(
        Path::new("w.yaml"),
        &definition("  - { name: a, call: { service: s, path: /x } }\n  - { name: b, call: { service: s, path: \"/${steps.a.output}\" } }\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not upstream of here"), "{e}");
}

#[test]
fn a_signal_is_accepted_when_a_step_waits_for_it_or_an_expression_reads_it() {
    let wf = Workflow::parse(
        Path::new("w.yaml"),
        &definition(
            "  - { name: a, waitForSignal: { name: approval } }\n  - { name: b, dependsOn: [a], when: \"has(signals.expedite) && signals.expedite\", sleep: { duration: 1s } }\n",
        ),
    )
    .unwrap();
    assert!(wf.accepts_signal("approval"));
    assert!(wf.accepts_signal("expedite"));
    assert!(!wf.accepts_signal("aproval"));
    // A comprehension variable named `signals` is not the root.
    let wf = Workflow::parse(
        Path::new("w.yaml"),
        &definition(
            "  - { name: a, when: \"[1].all(signals, signals > 0)\", sleep: { duration: 1s } }\n",
        ),
    )
    .unwrap();
    assert!(!wf.accepts_signal("anything"));
    // Reading `signals` by a computed key could mean any name.
    let wf = Workflow::parse(
        Path::new("w.yaml"),
        &definition("  - { name: a, call: { service: s, path: \"/${signals[input.kind]}\" } }\n"),
    )
    .unwrap();
    assert!(wf.accepts_signal("anything"));
}

/// Found by a hostile-input review: a result built from references to one large input string
/// costs nothing to compute but its size to copy, render and store (100 × 1 MB took the
/// control plane to 820 MB). Results and rendered values are bounded by size.
#[test]
fn large_results_and_rendered_values_are_refused_by_size() {
    let big = "x".repeat(1 << 20);
    let context = json!({"input": {"a": (0..100).collect::<Vec<_>>(), "s": big}});
    for expression in ["input.a.map(x, input.s)", "[input.s, input.s]"] {
        let e = evaluate(expression, &context).unwrap_err().to_string();
        assert!(e.contains("result too large"), "{expression}: {e}");
    }
    // Small results are fine; so is one copy of a large-ish string under the bound.
    let small = json!({"input": {"a": [1, 2, 3], "s": "abc"}});
    assert_eq!(
        evaluate("input.a.map(x, input.s)", &small).unwrap(),
        json!(["abc", "abc", "abc"])
    );
    // Many templates, each under the per-result bound, cannot add up to an unbounded value.
    let half = json!({"input": {"s": "y".repeat(700 << 10)}});
    let body = json!({"a": "${input.s}", "b": "${input.s}", "c": "${input.s}", "d": "${input.s}", "e": "${input.s}", "f": "${input.s}", "g": "${input.s}"});
    let e = render_value(&body, &half).unwrap_err().to_string();
    assert!(e.contains("too large"), "{e}");
    let e = render_str(
        "${input.s}${input.s}${input.s}${input.s}${input.s}${input.s}${input.s}",
        &half,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("too large"), "{e}");
}
