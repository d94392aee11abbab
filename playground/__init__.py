"""Yuan2.0-M32 Playground: a Gradio app, HTTP APIs and a LangChain model around one model manager."""

__version__ = "0.1.0"
