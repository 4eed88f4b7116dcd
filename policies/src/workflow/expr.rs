//! Bounds on one CEL expression (`when:` and `${…}` templates), so that no definition and no
//! run input can crash or stall the process that evaluates it.
//!
//! Three layers, cheapest first:
//!
//! 1. [`lexical`]: a scan of the raw text before any parsing — length, token count, and
//!    bracket nesting. The parser (antlr4rust) and its tree visitor recurse once per nesting
//!    level and once per chained operator, so unbounded input overflows the stack; the scan
//!    mirrors CEL's lexer (strings, raw strings, escapes, comments, escaped identifiers) so
//!    that brackets inside strings do not count and nothing can hide brackets from it.
//! 2. [`shape`]: a walk over the parsed AST — depth, node count, and how deeply
//!    comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) nest in each other's
//!    bodies (each level multiplies the work).
//! 3. [`estimate`]: before each evaluation, an upper bound on the work the expression does over
//!    the actual context (list lengths, string sizes; `map`/`filter` accumulate quadratically
//!    in `cel-interpreter`), refused above [`MAX_EVAL_COST`]. `cel-interpreter` has no cost
//!    limit of its own, so this is what keeps `input.items.map(…)` over a large input cheap.

use std::collections::HashMap;

use cel_parser::ast::{operators, EntryExpr, Expr, IdedExpr};
use cel_parser::reference::Val;
use serde_json::Value;

/// Longest expression, bytes of source text.
pub const MAX_EXPRESSION_BYTES: usize = 2048;
/// Most tokens in one expression (identifiers, literals, operators, brackets).
pub const MAX_EXPRESSION_TOKENS: usize = 256;
/// Deepest nesting of `(`, `[` and `{` in one expression.
pub const MAX_EXPRESSION_NESTING: usize = 16;
/// Deepest AST (after macro expansion): chained operators nest too (`a+b+c` is 2 deep).
pub const MAX_AST_DEPTH: usize = 64;
/// Most AST nodes (after macro expansion).
pub const MAX_AST_NODES: usize = 1024;
/// How many comprehensions may nest inside one another's bodies (`a.all(x, b.all(y, …))` is 2).
pub const MAX_COMPREHENSION_NESTING: usize = 2;
/// Largest estimated evaluation cost (roughly: values visited, compared or copied) of one
/// evaluation; see [`estimate`].
pub const MAX_EVAL_COST: u64 = 1_000_000;
/// Largest result of one expression, in bytes of its strings and bytes plus 8 per scalar,
/// list element or map entry (shared values counted at each use: that is what rendering
/// copies). A list of references to one large input string costs nothing to build but its
/// size to render and store.
pub const MAX_RESULT_BYTES: usize = 1 << 20;
/// Largest rendered value (a call's body, path and headers together), same measure.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// Takes `n` bytes off `budget`; `false` (and nothing taken) when it has fewer.
fn take(budget: &mut usize, n: usize) -> bool {
    match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    }
}

/// Whether `value`'s size (see [`MAX_RESULT_BYTES`]) is within `budget`, which it lowers;
/// stops at the first byte over.
pub fn cel_size_within(value: &cel_interpreter::Value, budget: &mut usize) -> bool {
    use cel_interpreter::objects::Key;
    use cel_interpreter::Value;
    match value {
        Value::String(s) => take(budget, s.len() + 2),
        Value::Bytes(b) => take(budget, b.len() + 2),
        Value::List(items) => take(budget, 8) && items.iter().all(|v| cel_size_within(v, budget)),
        Value::Map(map) => {
            take(budget, 8)
                && map.map.iter().all(|(k, v)| {
                    let key = match k {
                        Key::String(s) => s.len() + 2,
                        _ => 8,
                    };
                    take(budget, key) && cel_size_within(v, budget)
                })
        }
        _ => take(budget, 8),
    }
}

/// Whether `value`'s size (JSON, same measure as [`MAX_RESULT_BYTES`]) is within `budget`,
/// which it lowers.
pub fn json_size_within(value: &serde_json::Value, budget: &mut usize) -> bool {
    match value {
        serde_json::Value::String(s) => take(budget, s.len() + 2),
        serde_json::Value::Array(items) => {
            take(budget, 8) && items.iter().all(|v| json_size_within(v, budget))
        }
        serde_json::Value::Object(map) => {
            take(budget, 8)
                && map
                    .iter()
                    .all(|(k, v)| take(budget, k.len() + 2) && json_size_within(v, budget))
        }
        _ => take(budget, 8),
    }
}

/// Checks the raw text against [`MAX_EXPRESSION_BYTES`], [`MAX_EXPRESSION_TOKENS`] and
/// [`MAX_EXPRESSION_NESTING`] without parsing it. Malformed strings, escapes and characters
/// CEL's lexer does not know are refused here too (the parser would refuse them as well, but
/// it recovers from lexer errors and keeps parsing, so a mis-scanned string could otherwise
/// hide brackets).
///
/// # Errors
/// A message naming the bound that was exceeded or the malformed token.
pub fn lexical(source: &str) -> Result<(), String> {
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "expression is {} bytes long; at most {MAX_EXPRESSION_BYTES} are allowed",
            source.len()
        ));
    }
    let b = source.as_bytes();
    let mut i = 0;
    let mut tokens = 0usize;
    let mut depth = 0usize;
    let too_many = || {
        format!("expression has more than {MAX_EXPRESSION_TOKENS} tokens; split it or simplify it")
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' | 0x0c => {
                i += 1;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        tokens += 1;
        if tokens > MAX_EXPRESSION_TOKENS {
            return Err(too_many());
        }
        match c {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_EXPRESSION_NESTING {
                    return Err(format!(
                        "expression nests brackets more than {MAX_EXPRESSION_NESTING} deep"
                    ));
                }
                i += 1;
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' | b'\'' => i = string(b, i, false)?,
            b'`' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"_.-/ ".contains(&b[i])) {
                    i += 1;
                }
                if i == start + 1 || b.get(i) != Some(&b'`') {
                    return Err(format!("malformed escaped identifier at offset {start}"));
                }
                i += 1;
            }
            b'0'..=b'9' => i = number(b, i),
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => i = number(b, i),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                // String prefixes, exactly as CEL's lexer takes them (longest match): r, b, br.
                let word = &source[start..i];
                if matches!(b.get(i), Some(b'"' | b'\'')) {
                    let raw = matches!(word, "r" | "R" | "br" | "bR" | "Br" | "BR");
                    if raw || matches!(word, "b" | "B") {
                        i = string(b, i, raw)?;
                    }
                }
            }
            b'&' | b'|' | b'=' | b'!' | b'<' | b'>' => {
                let two = b
                    .get(i + 1)
                    .is_some_and(|n| matches!((c, *n), (b'&', b'&') | (b'|', b'|') | (_, b'=')));
                i += if two { 2 } else { 1 };
            }
            b'.' | b',' | b':' | b'?' | b'-' | b'+' | b'*' | b'/' | b'%' => i += 1,
            _ => {
                let ch = source[i..].chars().next().unwrap_or('?');
                return Err(format!("unexpected character {ch:?} at offset {i}"));
            }
        }
    }
    Ok(())
}

/// Skips a string literal starting at the quote `b[i]`; returns the offset after it.
fn string(b: &[u8], mut i: usize, raw: bool) -> Result<usize, String> {
    let start = i;
    let q = b[i];
    let triple = b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q);
    if triple {
        // `"""…"""`, ending at the first closing triple; CEL's lexer falls back to `""`
        // (an empty string) when there is none.
        let mut j = i + 3;
        while j < b.len() {
            if b[j] == q && b.get(j + 1) == Some(&q) && b.get(j + 2) == Some(&q) {
                return Ok(j + 3);
            }
            if b[j] == b'\\' && !raw {
                j = escape(b, j)?;
            } else {
                j += 1;
            }
        }
        return Ok(i + 2);
    }
    i += 1;
    while i < b.len() {
        match b[i] {
            c if c == q => return Ok(i + 1),
            b'\n' | b'\r' => break,
            b'\\' if !raw => i = escape(b, i)?,
            _ => i += 1,
        }
    }
    Err(format!("unterminated string at offset {start}"))
}

/// Checks the escape sequence at `b[i]` (a backslash); returns the offset after it.
fn escape(b: &[u8], i: usize) -> Result<usize, String> {
    let hex = |from: usize, n: usize| {
        (from..from + n).all(|k| b.get(k).is_some_and(u8::is_ascii_hexdigit))
    };
    let oct = |k: usize| b.get(k).is_some_and(|c| (b'0'..=b'7').contains(c));
    let end = match b.get(i + 1) {
        Some(
            b'a' | b'b' | b'f' | b'n' | b'r' | b't' | b'v' | b'"' | b'\'' | b'\\' | b'?' | b'`',
        ) => Some(i + 2),
        Some(b'0'..=b'3') if oct(i + 2) && oct(i + 3) => Some(i + 4),
        Some(b'x' | b'X') if hex(i + 2, 2) => Some(i + 4),
        Some(b'u') if hex(i + 2, 4) => Some(i + 6),
        Some(b'U') if hex(i + 2, 8) => Some(i + 10),
        _ => None,
    };
    end.ok_or_else(|| format!("invalid escape sequence at offset {i}"))
}

/// Skips a numeric literal (int, uint, hex, float with exponent) starting at `b[i]`.
fn number(b: &[u8], mut i: usize) -> usize {
    let digits = |mut i: usize, hex: bool| {
        while i < b.len() && (b[i].is_ascii_digit() || (hex && b[i].is_ascii_hexdigit())) {
            i += 1;
        }
        i
    };
    if b[i] == b'0'
        && matches!(b.get(i + 1), Some(b'x'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        i = digits(i + 2, true);
    } else {
        i = digits(i, false);
        if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1, false);
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
            if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
                i = digits(i + 1 + sign, false);
            }
        }
    }
    if matches!(b.get(i), Some(b'u' | b'U')) {
        i += 1;
    }
    i
}

/// The direct subexpressions of `e`, each with whether it is a comprehension body (evaluated
/// once per element).
pub(crate) fn children(e: &IdedExpr) -> Vec<(&IdedExpr, bool)> {
    match &e.expr {
        Expr::Call(c) => c
            .target
            .iter()
            .map(|t| &**t)
            .chain(c.args.iter())
            .map(|x| (x, false))
            .collect(),
        Expr::Comprehension(c) => vec![
            (&*c.iter_range, false),
            (&*c.accu_init, false),
            (&*c.loop_cond, true),
            (&*c.loop_step, true),
            (&*c.result, false),
        ],
        Expr::List(l) => l.elements.iter().map(|x| (x, false)).collect(),
        Expr::Map(m) => m
            .entries
            .iter()
            .flat_map(|entry| match &entry.expr {
                EntryExpr::MapEntry(e) => vec![(&e.key, false), (&e.value, false)],
                EntryExpr::StructField(f) => vec![(&f.value, false)],
            })
            .collect(),
        Expr::Struct(s) => s
            .entries
            .iter()
            .flat_map(|entry| match &entry.expr {
                EntryExpr::MapEntry(e) => vec![(&e.key, false), (&e.value, false)],
                EntryExpr::StructField(f) => vec![(&f.value, false)],
            })
            .collect(),
        Expr::Select(s) => vec![(&*s.operand, false)],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

/// Checks a parsed expression against [`MAX_AST_DEPTH`], [`MAX_AST_NODES`] and
/// [`MAX_COMPREHENSION_NESTING`]. Recursion stops at the depth bound, so any tree is safe to
/// check.
///
/// # Errors
/// A message naming the bound that was exceeded.
pub fn shape(ast: &IdedExpr) -> Result<(), String> {
    fn visit(e: &IdedExpr, depth: usize, nested: usize, nodes: &mut usize) -> Result<(), String> {
        *nodes += 1;
        if *nodes > MAX_AST_NODES {
            return Err(format!(
                "expression has more than {MAX_AST_NODES} nodes (after expanding all/exists/map/filter)"
            ));
        }
        if depth > MAX_AST_DEPTH {
            return Err(format!(
                "expression nests more than {MAX_AST_DEPTH} operations deep"
            ));
        }
        let here = nested + usize::from(matches!(e.expr, Expr::Comprehension(_)));
        if here > MAX_COMPREHENSION_NESTING {
            return Err(format!(
                "comprehensions (all, exists, exists_one, map, filter) nest more than \
                 {MAX_COMPREHENSION_NESTING} deep"
            ));
        }
        for (child, body) in children(e) {
            // Only a comprehension's body runs once per element; its range and result do not
            // multiply the work of what is inside them.
            visit(child, depth + 1, if body { here } else { nested }, nodes)?;
        }
        Ok(())
    }
    visit(ast, 0, 0, &mut 0)
}

/// Length of a JSON value as CEL sees it: elements, entries or bytes; 1 for a scalar.
fn len_of(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a.len() as u64,
        Value::Object(m) => m.len() as u64,
        Value::String(s) => s.len() as u64,
        _ => 1,
    }
}

/// The largest [`len_of`] of `v` and everything inside it (iterative: any depth).
fn deep_max(v: &Value) -> u64 {
    let mut max = 1;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        max = max.max(len_of(v));
        match v {
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(m) => stack.extend(m.values()),
            _ => {}
        }
    }
    max
}

struct Estimator<'a> {
    context: &'a Value,
    /// Bound on the length of any value not resolved to a place in the context.
    any: u64,
    /// Comprehension variables in scope: name and the bound on any length inside them.
    vars: Vec<(&'a str, u64)>,
    /// `deep_max` of context values already measured, by address.
    measured: HashMap<usize, u64>,
}

impl<'a> Estimator<'a> {
    fn var(&self, name: &str) -> Option<u64> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| *b)
    }

    /// `e` as a path into the context (`input.items`), if it is one.
    fn place(&self, e: &'a IdedExpr) -> Option<&'a Value> {
        match &e.expr {
            Expr::Ident(name) if self.var(name).is_none() => self.context.get(name),
            Expr::Select(s) if !s.test => self.place(&s.operand)?.get(&s.field),
            _ => None,
        }
    }

    /// Whether `e` reads a comprehension variable (`x.a.b`): its bound then applies.
    fn var_root(&self, e: &IdedExpr) -> Option<u64> {
        match &e.expr {
            Expr::Ident(name) => self.var(name),
            Expr::Select(s) => self.var_root(&s.operand),
            _ => None,
        }
    }

    /// [`deep_max`] of what a comprehension over `v` binds: its elements (a list) or its
    /// keys (a map).
    fn deep_elements(&mut self, v: &Value) -> u64 {
        // Keyed apart from `deep` (the same address measures something else).
        let key = (v as *const Value as usize) | 1;
        if let Some(m) = self.measured.get(&key) {
            return *m;
        }
        let m = match v {
            Value::Array(items) => items.iter().map(deep_max).max().unwrap_or(1),
            Value::Object(map) => map.keys().map(|k| k.len() as u64).max().unwrap_or(1),
            _ => 1,
        };
        self.measured.insert(key, m);
        m
    }

    fn deep(&mut self, v: &Value) -> u64 {
        let key = v as *const Value as usize;
        if let Some(m) = self.measured.get(&key) {
            return *m;
        }
        let m = deep_max(v);
        self.measured.insert(key, m);
        m
    }

    /// Upper bound on the length (elements, entries, bytes) of `e`'s value.
    fn size(&mut self, e: &'a IdedExpr) -> u64 {
        match &e.expr {
            Expr::Literal(Val::String(s)) => s.len() as u64,
            Expr::Literal(Val::Bytes(b)) => b.len() as u64,
            Expr::Literal(_) | Expr::Unspecified => 1,
            Expr::List(l) => l.elements.len() as u64,
            Expr::Map(m) => m.entries.len() as u64,
            Expr::Struct(s) => s.entries.len() as u64,
            Expr::Select(s) if s.test => 1,
            Expr::Ident(_) | Expr::Select(_) => {
                if let Some(bound) = self.var_root(e) {
                    bound
                } else if let Some(v) = self.place(e) {
                    len_of(v)
                } else {
                    self.any
                }
            }
            Expr::Comprehension(c) => {
                if matches!(c.accu_init.expr, Expr::List(_)) {
                    self.size(&c.iter_range)
                } else {
                    1
                }
            }
            Expr::Call(c) => {
                let args: Vec<&'a IdedExpr> =
                    c.target.iter().map(|t| &**t).chain(c.args.iter()).collect();
                match c.func_name.as_str() {
                    operators::ADD => args
                        .iter()
                        .map(|a| self.size(a))
                        .fold(0, u64::saturating_add),
                    operators::CONDITIONAL if args.len() == 3 => {
                        self.size(args[1]).max(self.size(args[2]))
                    }
                    operators::LOGICAL_AND
                    | operators::LOGICAL_OR
                    | operators::LOGICAL_NOT
                    | operators::NOT_STRICTLY_FALSE
                    | operators::EQUALS
                    | operators::NOT_EQUALS
                    | operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS
                    | operators::IN
                    | operators::SUBSTRACT
                    | operators::MULTIPLY
                    | operators::DIVIDE
                    | operators::MODULO
                    | operators::NEGATE
                    | "size"
                    | "int"
                    | "uint"
                    | "double"
                    | "contains"
                    | "startsWith"
                    | "endsWith"
                    | "matches"
                    | "duration"
                    | "timestamp" => 1,
                    operators::INDEX => match args.first() {
                        Some(t) => self.elements(t),
                        None => 1,
                    },
                    _ => {
                        let any = self.any;
                        args.iter()
                            .map(|a| self.size(a))
                            .fold(any, u64::saturating_add)
                    }
                }
            }
        }
    }

    /// Upper bound on any length inside the elements of `range` (what a comprehension
    /// variable over it holds).
    fn elements(&mut self, range: &'a IdedExpr) -> u64 {
        if let Some(bound) = self.var_root(range) {
            return bound;
        }
        if let Some(v) = self.place(range) {
            return self.deep_elements(v);
        }
        match &range.expr {
            Expr::List(l) => l.elements.iter().map(|x| self.size(x)).max().unwrap_or(1),
            _ => self.any,
        }
    }

    /// Upper bound on the work of evaluating `e` once.
    fn cost(&mut self, e: &'a IdedExpr) -> u64 {
        let sum = |this: &mut Self, items: &mut dyn Iterator<Item = &'a IdedExpr>| {
            items.fold(0u64, |acc, x| acc.saturating_add(this.cost(x)))
        };
        match &e.expr {
            Expr::Literal(_) | Expr::Ident(_) | Expr::Unspecified => 1,
            Expr::Select(s) => 1 + self.cost(&s.operand),
            Expr::List(l) => {
                sum(self, &mut l.elements.iter()).saturating_add(1 + l.elements.len() as u64)
            }
            Expr::Map(_) | Expr::Struct(_) => {
                let parts: Vec<&'a IdedExpr> = children(e).into_iter().map(|(c, _)| c).collect();
                sum(self, &mut parts.iter().copied()).saturating_add(1 + parts.len() as u64)
            }
            Expr::Call(c) => {
                let args: Vec<&'a IdedExpr> =
                    c.target.iter().map(|t| &**t).chain(c.args.iter()).collect();
                let mut total = sum(self, &mut args.iter().copied()).saturating_add(1);
                // Operations that copy, compare or scan their operands take time in their
                // length (`+` on lists and strings, `==` on lists, `in`, string functions).
                let scans = !matches!(
                    c.func_name.as_str(),
                    operators::LOGICAL_AND
                        | operators::LOGICAL_OR
                        | operators::LOGICAL_NOT
                        | operators::NOT_STRICTLY_FALSE
                        | operators::CONDITIONAL
                        | operators::INDEX
                        | operators::NEGATE
                        | "size"
                );
                if scans {
                    for a in &args {
                        total = total.saturating_add(self.size(a));
                    }
                }
                total
            }
            Expr::Comprehension(c) => {
                let n = self.size(&c.iter_range);
                let elements = self.elements(&c.iter_range);
                let accumulates = matches!(c.accu_init.expr, Expr::List(_));
                let mut total = 1u64
                    .saturating_add(self.cost(&c.iter_range))
                    .saturating_add(self.cost(&c.accu_init));
                self.vars.push((c.iter_var.as_str(), elements));
                if let Some(v2) = &c.iter_var2 {
                    self.vars.push((v2.as_str(), elements));
                }
                self.vars
                    .push((c.accu_var.as_str(), if accumulates { n } else { 1 }));
                // `map` and `filter` copy the accumulated list at every step (`@result + [x]`,
                // counted by `+` with `@result` as long as the range): quadratic.
                let body = self
                    .cost(&c.loop_cond)
                    .saturating_add(self.cost(&c.loop_step));
                total = total
                    .saturating_add(n.saturating_mul(body))
                    .saturating_add(self.cost(&c.result));
                let pushed = 2 + usize::from(c.iter_var2.is_some());
                self.vars.truncate(self.vars.len() - pushed);
                total
            }
        }
    }
}

/// An upper bound on the work of evaluating `ast` over `context` (a JSON object whose keys
/// are the roots): about one unit per value visited, compared or copied. Comprehensions
/// multiply the work of their body by the length of their range (taken from the context when
/// the range is a path into it); `map` and `filter` add the length of the list they build at
/// each step. Linear in the AST plus one pass over the context.
pub fn estimate(ast: &IdedExpr, context: &Value) -> u64 {
    let mut estimator = Estimator {
        context,
        any: 1,
        vars: Vec::new(),
        measured: HashMap::new(),
    };
    estimator.any = estimator.deep(context).max(1);
    estimator.cost(ast)
}
