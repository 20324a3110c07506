//! Tag lists, paged as the distribution spec says: lexical order, at most
//! `n` tags after `last`, and a `Link` to the next page while there is one.

use crate::oci::{RepositoryName, Tag};

/// Tags on a page when the client gives no `n`. The spec lets a registry
/// page on its own; clients (skopeo, crane, regctl) follow `Link`.
pub const DEFAULT_PAGE: usize = 100;
/// The most tags on one page, whatever `n` asks.
pub const MAX_PAGE: usize = 1000;

/// What the query asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    n: Option<usize>,
    last: Option<String>,
}

/// The page after the one answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Next {
    n: usize,
    last: String,
}

impl Next {
    /// The `Link` header value that asks for it.
    pub fn link(&self, name: &RepositoryName) -> String {
        format!(
            "</v2/{name}/tags/list?n={}&last={}>; rel=\"next\"",
            self.n, self.last
        )
    }
}

impl Page {
    pub fn parse(query: &str) -> Result<Page, String> {
        let mut page = Page::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "n" => {
                    let n = value.parse::<usize>().map_err(|_| {
                        format!("n={value:?} is not a number of tags (0 to {MAX_PAGE})")
                    })?;
                    page.n = Some(n);
                }
                "last" => page.last = Some(value.into_owned()),
                // Unknown parameters are ignored, as for any HTTP resource.
                _ => {}
            }
        }
        Ok(page)
    }

    /// This page of `all` (sorted), and the next page if there is more.
    pub fn of<'a>(&self, all: &'a [String]) -> (&'a [String], Option<Next>) {
        let n = self.n.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        let start = match &self.last {
            Some(last) => all.partition_point(|t| t.as_str() <= last.as_str()),
            None => 0,
        };
        let end = start.saturating_add(n).min(all.len());
        let page = &all[start..end];
        let next = match (end < all.len(), page.last()) {
            (true, Some(last)) => Some(Next {
                n,
                last: last.clone(),
            }),
            _ => None,
        };
        (page, next)
    }
}

/// A generator's tags as a client may use them: valid tags only (a Go
/// version with `+incompatible`, a branch with `/`, cannot be pulled), in
/// lexical order, once each.
pub fn sorted(mut tags: Vec<String>) -> Vec<String> {
    tags.retain(|t| t.parse::<Tag>().is_ok());
    tags.sort();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_last_and_stop_at_the_end() {
        let all = sorted((0..250).map(|i| format!("t{i:03}")).collect());
        let first = Page::parse("n=100").unwrap();
        let (page, next) = first.of(&all);
        assert_eq!((page.len(), page[0].as_str()), (100, "t000"));
        let next = next.expect("more");
        let name: RepositoryName = "mirror/app".parse().unwrap();
        assert_eq!(
            next.link(&name),
            "</v2/mirror/app/tags/list?n=100&last=t099>; rel=\"next\""
        );
        let (page, next) = Page::parse("n=100&last=t199").unwrap().of(&all);
        assert_eq!((page.len(), page[0].as_str()), (50, "t200"));
        assert_eq!(next, None);
        let (page, next) = Page::parse("").unwrap().of(&all);
        assert_eq!((page.len(), next.is_some()), (DEFAULT_PAGE, true));
        let (page, next) = Page::parse("n=0").unwrap().of(&all);
        assert_eq!((page.len(), next), (0, None));
        let (page, _) = Page::parse("last=zzz").unwrap().of(&all);
        assert!(page.is_empty());
        assert!(Page::parse("n=-1").is_err());
    }

    #[test]
    fn tags_that_cannot_be_pulled_are_left_out() {
        let tags = sorted(vec![
            "v2.0.0+incompatible".into(),
            "feature/x".into(),
            "v1.0.0".into(),
            "latest".into(),
            "v1.0.0".into(),
        ]);
        assert_eq!(tags, ["latest", "v1.0.0"]);
    }
}
