//! The results of `meshflow check` and how they are shown: grouped by category, one line per
//! check (`√` passed, `‼` warning, `×` failed, `-` skipped), an indented message and hint under
//! anything that did not pass, and a last line `Status check results are √` (or `×`); or the
//! same as JSON.

use serde::Serialize;

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It passed (`√`).
    Success,
    /// It passed with a warning (`‼`): the mesh works, but something needs attention soon.
    Warning,
    /// It failed (`×`): `meshflow check` exits 1.
    Error,
    /// It could not run because an earlier check failed (`-`); never counted as passed.
    Skipped,
}

impl Outcome {
    /// The symbol a text line starts with.
    pub fn symbol(self) -> &'static str {
        match self {
            Outcome::Success => "√",
            Outcome::Warning => "‼",
            Outcome::Error => "×",
            Outcome::Skipped => "-",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// Its category, e.g. `control-plane`.
    #[serde(skip)]
    pub category: String,
    /// What was checked, e.g. `the leader Lease meshflow-control-plane is held and renewed`.
    pub description: String,
    /// How it ended.
    pub result: Outcome,
    /// What went wrong (warnings, errors), or why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Every result of one run, in the order the checks ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The results.
    pub results: Vec<CheckResult>,
}

impl Report {
    /// Records a result.
    pub fn add(
        &mut self,
        category: &str,
        description: impl Into<String>,
        result: Outcome,
        message: Option<String>,
        hint: Option<String>,
    ) {
        self.results.push(CheckResult {
            category: category.to_string(),
            description: description.into(),
            result,
            message,
            hint,
        });
    }

    /// Records a passed check.
    pub fn pass(&mut self, category: &str, description: impl Into<String>) {
        self.add(category, description, Outcome::Success, None, None);
    }

    /// Records a warning: `message` says what, `hint` what to do.
    pub fn warn(
        &mut self,
        category: &str,
        description: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.add(
            category,
            description,
            Outcome::Warning,
            Some(message.into()),
            non_empty(hint.into()),
        );
    }

    /// Records a failed check: `message` says what, `hint` what to do.
    pub fn fail(
        &mut self,
        category: &str,
        description: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.add(
            category,
            description,
            Outcome::Error,
            Some(message.into()),
            non_empty(hint.into()),
        );
    }

    /// Records a check that could not run, with `why`.
    pub fn skip(&mut self, category: &str, description: impl Into<String>, why: impl Into<String>) {
        self.add(
            category,
            description,
            Outcome::Skipped,
            Some(why.into()),
            None,
        );
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.result == Outcome::Error)
    }

    /// The process's exit code: 1 when a check failed, else 0 (warnings and skips included —
    /// a skip always follows a failure, except for checks that do not apply).
    pub fn exit_code(&self) -> i32 {
        i32::from(self.failed())
    }

    /// The categories in the order they first appear, each with its results.
    fn categories(&self) -> Vec<(&str, Vec<&CheckResult>)> {
        let mut out: Vec<(&str, Vec<&CheckResult>)> = Vec::new();
        for result in &self.results {
            match out.iter_mut().find(|(c, _)| *c == result.category) {
                Some((_, list)) => list.push(result),
                None => out.push((&result.category, vec![result])),
            }
        }
        out
    }

    /// The text form:
    ///
    /// ```text
    /// kubernetes-api
    /// --------------
    /// √ can initialize the client
    /// × can query the Kubernetes API
    ///     cannot reach …
    ///     hint: …
    ///
    /// Status check results are ×
    /// ```
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (category, results) in self.categories() {
            out.push_str(category);
            out.push('\n');
            out.push_str(&"-".repeat(category.chars().count()));
            out.push('\n');
            for r in results {
                out.push_str(r.result.symbol());
                out.push(' ');
                out.push_str(&r.description);
                out.push('\n');
                if let Some(message) = &r.message {
                    let prefix = if r.result == Outcome::Skipped {
                        "skipped: "
                    } else {
                        ""
                    };
                    for (i, line) in message.lines().enumerate() {
                        let lead = if i == 0 { prefix } else { "" };
                        out.push_str(&format!("    {lead}{line}\n"));
                    }
                }
                if let Some(hint) = &r.hint {
                    out.push_str(&format!("    hint: {hint}\n"));
                }
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "Status check results are {}\n",
            if self.failed() { "×" } else { "√" }
        ));
        out
    }

    /// The JSON form: `{"success": bool, "categories": [{"categoryName": …, "checks":
    /// [{"description", "result": "success"|"warning"|"error"|"skipped", "message"?,
    /// "hint"?}]}]}` (the shape of `linkerd check -o json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "success": !self.failed(),
            "categories": self.categories().into_iter().map(|(name, checks)| serde_json::json!({
                "categoryName": name,
                "checks": checks,
            })).collect::<Vec<_>>(),
        })
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut report = Report::default();
        report.pass("kubernetes-api", "can query the Kubernetes API");
        report.warn(
            "identity",
            "the mesh CA is valid",
            "it expires in 12 days",
            "rotate it",
        );
        report.fail(
            "control-plane",
            "control plane http://127.0.0.1:1 is ready",
            "cannot reach http://127.0.0.1:1/ready: connection refused",
            "is it running?",
        );
        report.skip(
            "data-plane",
            "sidecars run the current config",
            "no control plane replica answered",
        );
        report.pass("kubernetes-api", "can initialize the client");
        report
    }

    #[test]
    fn text_groups_by_category_in_first_seen_order_with_messages_and_hints() {
        let text = sample().render_text();
        assert_eq!(
            text,
            "kubernetes-api\n--------------\n\
             √ can query the Kubernetes API\n\
             √ can initialize the client\n\n\
             identity\n--------\n\
             ‼ the mesh CA is valid\n    it expires in 12 days\n    hint: rotate it\n\n\
             control-plane\n-------------\n\
             × control plane http://127.0.0.1:1 is ready\n    cannot reach http://127.0.0.1:1/ready: connection refused\n    hint: is it running?\n\n\
             data-plane\n----------\n\
             - sidecars run the current config\n    skipped: no control plane replica answered\n\n\
             Status check results are ×\n"
        );
    }

    #[test]
    fn warnings_and_skips_alone_do_not_fail() {
        let mut report = Report::default();
        report.warn("identity", "x", "soon", "");
        report.skip("data-plane", "y", "n/a");
        assert!(!report.failed());
        assert_eq!(report.exit_code(), 0);
        assert!(report
            .render_text()
            .ends_with("Status check results are √\n"));
        // An empty hint is left out.
        assert_eq!(report.results[0].hint, None);
        assert_eq!(sample().exit_code(), 1);
    }

    #[test]
    fn json_has_the_same_results() {
        let json = sample().to_json();
        assert_eq!(json["success"], false);
        assert_eq!(json["categories"][0]["categoryName"], "kubernetes-api");
        assert_eq!(json["categories"][0]["checks"][1]["result"], "success");
        assert!(json["categories"][0]["checks"][1].get("message").is_none());
        let failed = &json["categories"][2]["checks"][0];
        assert_eq!(failed["result"], "error");
        assert_eq!(failed["hint"], "is it running?");
        assert_eq!(json["categories"][3]["checks"][0]["result"], "skipped");
    }
}
