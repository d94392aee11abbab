"""The Gradio Blocks app: one module per tab, all talking to the model manager."""
