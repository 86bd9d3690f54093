// Try it out, streamed: Swagger UI shows an answer only once its body has ended, so a
// text/event-stream answer would stay blank for the whole generation. This plugin reads such
// an answer itself and shows each event in the response panel as it arrives; the finished
// text is then handed to Swagger UI as usual.
const OaBypassStreamed = (() => {
  let system = null;
  // The operation being executed: Swagger UI's fetch does not say which one it serves.
  let executing = null;

  const plugin = (pluginSystem) => {
    system = pluginSystem;
    return {
      statePlugins: {
        spec: {
          wrapActions: {
            executeRequest: (next) => (request) => {
              executing = { path: request.pathName, method: request.method };
              return next(request);
            },
          },
        },
      },
    };
  };

  const show = (target, response, started, text) => {
    const headers = {};
    response.headers.forEach((value, name) => {
      headers[name] = value;
    });
    system.specActions.setResponse(target.path, target.method, {
      ok: response.ok,
      url: response.url,
      status: response.status,
      statusText: response.statusText,
      headers,
      text,
      data: text,
      body: text,
      duration: Date.now() - started,
    });
  };

  const fetchStreamed = async (url, init) => {
    const target = executing;
    const started = Date.now();
    const response = await fetch(url, init);
    const type = response.headers.get("content-type") || "";
    if (!system || !target || !response.body || !type.startsWith("text/event-stream")) {
      return response;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      show(target, response, started, text);
    }
    text += decoder.decode();
    return new Response(text, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };

  return {
    plugin,
    requestInterceptor: (request) => {
      request.userFetch = fetchStreamed;
      return request;
    },
  };
})();
