"""llmkit.adapt"""
