//! Build plans (Buildpack API 0.10): what each buildpack's `bin/detect`
//! says it provides and requires, with `[[or]]` alternatives, resolved for a
//! group so that every `requires` is provided and every `provides`
//! required; optional buildpacks that cannot fit drop out.

use std::collections::BTreeSet;

use serde::Deserialize;

use super::lifecycle::GroupEntry;

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub struct PlanItem {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<toml::Table>,
}

/// One way a buildpack's needs can be met.
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct PlanOption {
    #[serde(default)]
    provides: Vec<PlanItem>,
    #[serde(default)]
    requires: Vec<PlanItem>,
}

/// What `bin/detect` wrote: a plan, and `[[or]]` alternatives to it.
#[derive(Debug, Default, Deserialize)]
pub(super) struct DetectPlan {
    #[serde(flatten)]
    main: PlanOption,
    #[serde(default)]
    or: Vec<PlanOption>,
}

impl DetectPlan {
    fn options(&self) -> Vec<PlanOption> {
        std::iter::once(self.main.clone())
            .chain(self.or.iter().cloned())
            .collect()
    }
}

/// Combinations of `[[or]]` alternatives tried before giving up on a group.
const MAX_PLAN_COMBINATIONS: usize = 256;

/// The group's plan: a choice among each buildpack's `[[or]]` options (the
/// first combination that works, main plans first) under which every
/// `requires` is provided and every `provides` required; optional
/// buildpacks that cannot fit drop out. Each buildpack gets the requires
/// entries of what it provides.
pub(super) fn resolve_plan(
    passed: Vec<(GroupEntry, DetectPlan)>,
) -> Result<Vec<(GroupEntry, Vec<PlanItem>)>, String> {
    let options: Vec<Vec<PlanOption>> = passed.iter().map(|(_, p)| p.options()).collect();
    let mut choice = vec![0usize; passed.len()];
    let mut first_error = None;
    for _ in 0..MAX_PLAN_COMBINATIONS {
        let chosen: Vec<(GroupEntry, PlanOption)> = passed
            .iter()
            .zip(&choice)
            .map(|((bp, _), &c)| (bp.clone(), options_for(&options, &passed, bp, c)))
            .collect();
        match resolve_choice(chosen) {
            Ok(group) => return Ok(group),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        // Next combination (odometer order, last buildpack fastest).
        let mut i = choice.len();
        loop {
            if i == 0 {
                return Err(first_error.unwrap_or_default());
            }
            i -= 1;
            choice[i] += 1;
            if choice[i] < options[i].len() {
                break;
            }
            choice[i] = 0;
        }
    }
    Err(first_error.unwrap_or_default())
}

fn options_for(
    options: &[Vec<PlanOption>],
    passed: &[(GroupEntry, DetectPlan)],
    bp: &GroupEntry,
    c: usize,
) -> PlanOption {
    let index = passed.iter().position(|(b, _)| b.id == bp.id).unwrap_or(0);
    options[index][c].clone()
}

fn resolve_choice(
    mut passed: Vec<(GroupEntry, PlanOption)>,
) -> Result<Vec<(GroupEntry, Vec<PlanItem>)>, String> {
    loop {
        let provided: BTreeSet<&str> = passed
            .iter()
            .flat_map(|(_, p)| p.provides.iter().map(|i| i.name.as_str()))
            .collect();
        let required: BTreeSet<&str> = passed
            .iter()
            .flat_map(|(_, p)| p.requires.iter().map(|i| i.name.as_str()))
            .collect();
        let bad = passed.iter().position(|(_, p)| {
            p.requires
                .iter()
                .any(|r| !provided.contains(r.name.as_str()))
                || p.provides
                    .iter()
                    .any(|r| !required.contains(r.name.as_str()))
        });
        let Some(i) = bad else {
            let all_requires: Vec<PlanItem> = passed
                .iter()
                .flat_map(|(_, p)| p.requires.iter().cloned())
                .collect();
            return Ok(passed
                .iter()
                .map(|(bp, plan)| {
                    let mine: BTreeSet<&str> =
                        plan.provides.iter().map(|p| p.name.as_str()).collect();
                    let entries = all_requires
                        .iter()
                        .filter(|r| mine.contains(r.name.as_str()))
                        .cloned()
                        .collect();
                    (bp.clone(), entries)
                })
                .collect());
        };
        let (bp, plan) = &passed[i];
        if bp.optional {
            passed.remove(i);
            continue;
        }
        let unmet: Vec<&str> = plan
            .requires
            .iter()
            .filter(|r| !provided.contains(r.name.as_str()))
            .map(|r| r.name.as_str())
            .collect();
        return Err(if unmet.is_empty() {
            format!("{}@{} provides what nothing requires", bp.id, bp.version)
        } else {
            format!(
                "{}@{} requires {} that nothing provides",
                bp.id,
                bp.version,
                unmet.join(", ")
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, optional: bool) -> GroupEntry {
        GroupEntry {
            id: id.into(),
            version: "1".into(),
            optional,
            own: None,
        }
    }

    fn item(name: &str) -> PlanItem {
        PlanItem {
            name: name.into(),
            metadata: None,
        }
    }

    fn plan(provides: &[&str], requires: &[&str]) -> DetectPlan {
        DetectPlan {
            main: PlanOption {
                provides: provides.iter().map(|n| item(n)).collect(),
                requires: requires.iter().map(|n| item(n)).collect(),
            },
            or: vec![],
        }
    }

    #[test]
    fn or_alternatives_are_tried() {
        let text = "[[provides]]\nname = \"a\"\n[[or]]\n[[or.provides]]\nname = \"b\"\n";
        let tool: DetectPlan = toml::from_str(text).unwrap();
        let ok = resolve_plan(vec![
            (entry("tool", false), tool),
            (entry("app", false), plan(&[], &["b"])),
        ])
        .unwrap();
        assert_eq!(ok[0].1[0].name, "b");
    }

    #[test]
    fn plans_resolve_and_optional_buildpacks_drop_out() {
        let ok = resolve_plan(vec![
            (entry("tool", false), plan(&["tool"], &[])),
            (entry("app", false), plan(&[], &["tool"])),
            (entry("extra", true), plan(&["unused"], &[])),
        ])
        .unwrap();
        let ids: Vec<&str> = ok.iter().map(|(b, _)| b.id.as_str()).collect();
        assert_eq!(ids, ["tool", "app"]);
        // The provider gets the requires entry; the requirer gets nothing.
        assert_eq!(ok[0].1.len(), 1);
        assert!(ok[1].1.is_empty());
        let err = resolve_plan(vec![(entry("app", false), plan(&[], &["node"]))]).unwrap_err();
        assert!(err.contains("requires node"), "{err}");
    }
}
