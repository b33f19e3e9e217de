"""llmkit.eval"""
