"""llmkit.interop"""
