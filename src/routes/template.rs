//! Path templates as OpenAPI writes them (`/v1/threads/{thread_id}/runs`), and the check
//! every path parameter passes before anything goes upstream.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use percent_encoding::percent_decode_str;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Static(String),
    Param(String),
}

/// A path template as OpenAPI writes it: `/v1/files/{file_id}/content`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must start with '/'")]
    NoLeadingSlash,
    #[error("has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    #[error("has an unclosed '{{' in segment {0:?}")]
    Unclosed(String),
    #[error("has an empty parameter name '{{}}'")]
    EmptyParam,
    #[error("has a parameter that does not fill its whole segment: {0:?}")]
    PartialParam(String),
    #[error("parameter name {0:?} may only hold letters, digits and '_'")]
    BadParamName(String),
    #[error("repeats the parameter name {0:?}")]
    RepeatedParam(String),
    #[error("has a character the router reserves in segment {0:?} (one of : * < > {{ }})")]
    ReservedChar(String),
}

impl PathTemplate {
    pub fn parse(source: &str) -> Result<PathTemplate, TemplateError> {
        let rest = source
            .strip_prefix('/')
            .ok_or(TemplateError::NoLeadingSlash)?;
        let mut segments = Vec::new();
        let mut seen = BTreeSet::new();
        if rest.is_empty() {
            return Ok(PathTemplate {
                source: source.to_owned(),
                segments,
            });
        }
        for raw in rest.split('/') {
            if raw.is_empty() {
                return Err(TemplateError::EmptySegment);
            }
            let segment = if let Some(inner) = raw.strip_prefix('{') {
                let name = inner
                    .strip_suffix('}')
                    .ok_or_else(|| TemplateError::Unclosed(raw.to_owned()))?;
                if name.is_empty() {
                    return Err(TemplateError::EmptyParam);
                }
                if name.contains(['{', '}']) {
                    return Err(TemplateError::PartialParam(raw.to_owned()));
                }
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(TemplateError::BadParamName(name.to_owned()));
                }
                if !seen.insert(name.to_owned()) {
                    return Err(TemplateError::RepeatedParam(name.to_owned()));
                }
                Segment::Param(name.to_owned())
            } else if raw.contains('{') {
                return Err(if raw.contains('}') {
                    TemplateError::PartialParam(raw.to_owned())
                } else {
                    TemplateError::Unclosed(raw.to_owned())
                });
            } else if raw.contains([':', '*', '<', '>', '}']) {
                return Err(TemplateError::ReservedChar(raw.to_owned()));
            } else {
                Segment::Static(raw.to_owned())
            };
            segments.push(segment);
        }
        Ok(PathTemplate {
            source: source.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Param(name) => Some(name.as_str()),
            Segment::Static(_) => None,
        })
    }

    /// The parameters of `path`, a request path that matches this template: each name with
    /// its segment percent-decoded once, as the router and the upstream decode it (`None`:
    /// not UTF-8 once decoded).
    pub fn params_in<'a>(
        &'a self,
        path: &'a str,
    ) -> impl Iterator<Item = (&'a str, Option<Cow<'a, str>>)> + 'a {
        let mut parts = path.split('/').skip(1);
        self.segments.iter().filter_map(move |segment| {
            let part = parts.next();
            match segment {
                Segment::Static(_) => None,
                Segment::Param(name) => Some((
                    name.as_str(),
                    part.and_then(|raw| percent_decode_str(raw).decode_utf8().ok()),
                )),
            }
        })
    }

    /// The template in poem's router syntax: `{name}` becomes `:name`.
    pub fn to_poem_path(&self) -> String {
        if self.segments.is_empty() {
            return "/".to_owned();
        }
        let mut out = String::with_capacity(self.source.len());
        for segment in &self.segments {
            out.push('/');
            match segment {
                Segment::Static(s) => out.push_str(s),
                Segment::Param(name) => {
                    out.push(':');
                    out.push_str(name);
                }
            }
        }
        out
    }

    /// The shape the router sees: parameter names erased. Two templates with the same shape
    /// match exactly the same requests, so the router cannot tell them apart.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            out.push('/');
            match segment {
                Segment::Static(s) => out.push_str(s),
                Segment::Param(_) => out.push_str("{}"),
            }
        }
        out
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Why a matched path parameter is refused before anything is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamProblem {
    Empty,
    NotUtf8,
    Slash,
    DotSegment,
    ControlChar,
}

impl ParamProblem {
    pub fn describe(self) -> &'static str {
        match self {
            ParamProblem::Empty => "is empty",
            ParamProblem::NotUtf8 => "is not valid UTF-8 once decoded",
            ParamProblem::Slash => "contains '/' or '\\' once decoded",
            ParamProblem::DotSegment => "is a '.' or '..' segment once decoded",
            ParamProblem::ControlChar => "contains a control character once decoded",
        }
    }
}

/// Checks one path parameter as the router decoded it (`None`: it did not decode to UTF-8).
///
/// The upstream receives the raw path byte for byte and decodes it once, as the router did,
/// so a value that decodes to a separator or a dot segment could address a different
/// resource there than the route we matched.
pub fn check_path_param(decoded: Option<&str>) -> Result<(), ParamProblem> {
    let value = decoded.ok_or(ParamProblem::NotUtf8)?;
    if value.is_empty() {
        return Err(ParamProblem::Empty);
    }
    if value == "." || value == ".." {
        return Err(ParamProblem::DotSegment);
    }
    if value.contains(['/', '\\']) {
        return Err(ParamProblem::Slash);
    }
    if value.chars().any(char::is_control) {
        return Err(ParamProblem::ControlChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openapi_templates() {
        let t = PathTemplate::parse("/v1/threads/{thread_id}/runs/{run_id}/cancel").unwrap();
        assert_eq!(t.params().collect::<Vec<_>>(), ["thread_id", "run_id"]);
        assert_eq!(
            t.to_poem_path(),
            "/v1/threads/:thread_id/runs/:run_id/cancel"
        );
        assert_eq!(t.shape(), "/v1/threads/{}/runs/{}/cancel");
    }

    #[test]
    fn root_template_is_slash() {
        assert_eq!(PathTemplate::parse("/").unwrap().to_poem_path(), "/");
    }

    #[test]
    fn rejects_malformed_templates() {
        let cases = [
            ("v1/models", TemplateError::NoLeadingSlash),
            ("/v1//models", TemplateError::EmptySegment),
            ("/v1/models/", TemplateError::EmptySegment),
            ("/v1/{unclosed", TemplateError::Unclosed("{unclosed".into())),
            (
                "/v1/unopened}",
                TemplateError::ReservedChar("unopened}".into()),
            ),
            ("/v1/{}", TemplateError::EmptyParam),
            ("/v1/x{id}", TemplateError::PartialParam("x{id}".into())),
            ("/v1/{a-b}", TemplateError::BadParamName("a-b".into())),
            ("/v1/{id}/x/{id}", TemplateError::RepeatedParam("id".into())),
            ("/v1/:id", TemplateError::ReservedChar(":id".into())),
            ("/v1/*rest", TemplateError::ReservedChar("*rest".into())),
        ];
        for (source, expected) in cases {
            assert_eq!(PathTemplate::parse(source), Err(expected), "{source}");
        }
    }

    #[test]
    fn param_check_refuses_what_could_escape_the_route() {
        let check = |value: &str| check_path_param(Some(value));
        assert_eq!(check("file-abc123"), Ok(()));
        assert_eq!(check("ft:gpt-4o:org"), Ok(()));
        assert_eq!(check("%2F"), Ok(()), "decoded once, as the upstream will");
        assert_eq!(check("a/b"), Err(ParamProblem::Slash));
        assert_eq!(check("a\\b"), Err(ParamProblem::Slash));
        assert_eq!(check(".."), Err(ParamProblem::DotSegment));
        assert_eq!(check("."), Err(ParamProblem::DotSegment));
        assert_eq!(check("a\nb"), Err(ParamProblem::ControlChar));
        assert_eq!(check("a\u{0}"), Err(ParamProblem::ControlChar));
        assert_eq!(check("a\u{7f}"), Err(ParamProblem::ControlChar));
        assert_eq!(check("...."), Ok(()));
        assert_eq!(check(""), Err(ParamProblem::Empty));
        assert_eq!(check_path_param(None), Err(ParamProblem::NotUtf8));
    }
}
