//! The request examples a route carries for the docs: a JSON body, its streaming variant,
//! and multipart form fields written as curl's `-F` arguments (`file=@audio.mp3`).

use serde_json::Value;

/// What Swagger UI prefills for one route (`example`, `stream_example`, `form`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examples {
    /// A small, valid JSON body.
    pub json: Option<Value>,
    /// The same request asking for a stream, offered as a second, named example.
    pub stream: Option<Value>,
    /// Multipart form fields, in the order the manifest lists them.
    pub form: Vec<FormField>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormField {
    pub name: String,
    pub value: FormValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormValue {
    /// `name=@file.ext`: a file part; the name is a suggestion for the file to pick.
    File(String),
    /// `name=text`: a text part.
    Text(String),
}

impl FormField {
    /// Reads curl's `-F` form: `name=text`, or `name=@file` for a file.
    pub fn parse(entry: &str) -> Result<FormField, &'static str> {
        let Some((name, value)) = entry.split_once('=') else {
            return Err("is not name=value (or name=@file)");
        };
        if name.is_empty() || name.chars().any(|c| c.is_control() || c == '"') {
            return Err("needs a field name without quotes or control characters");
        }
        let value = match value.strip_prefix('@') {
            Some(file) => FormValue::File(file.to_owned()),
            None => FormValue::Text(value.to_owned()),
        };
        Ok(FormField {
            name: name.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_read_like_curl() {
        assert_eq!(
            FormField::parse("file=@audio.mp3"),
            Ok(FormField {
                name: "file".into(),
                value: FormValue::File("audio.mp3".into())
            })
        );
        assert_eq!(
            FormField::parse("session={\"a\":1}").map(|f| f.value),
            Ok(FormValue::Text("{\"a\":1}".into()))
        );
        assert!(FormField::parse("no value").is_err());
        assert!(FormField::parse("=x").is_err());
    }
}
