"""`mmt serve`: saved runs behind an HTTP API with dynamic batching, and a web page.

    app.py      the FastAPI app: /v1/vqa, /v1/caption, /v1/search, /v1/explain, /v1/generate, /v1/models, /healthz, the page
    bodies.py   what a request may hold (JSON or form data), read and checked
    batcher.py  requests that arrive together go through the model as one batch, on a worker thread
    page/       the web page at / (plain HTML, CSS and JavaScript, nothing fetched from elsewhere)

Needs the `serve` extra (fastapi, uvicorn, python-multipart). Usage: docs/usage/serve.md.
"""
