//! A request's method as a bounded, static name: a metric's label and a span's
//! `http.request.method`, without an allocation.

use http::Method;

/// A method as a label value: the manifest only has the first five.
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
