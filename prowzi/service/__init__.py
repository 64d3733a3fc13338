"""The Prowzi HTTP service: :func:`prowzi.service.app.create_app` builds the FastAPI app,
:func:`prowzi.service.server.serve` runs it under uvicorn with a graceful SIGTERM."""
