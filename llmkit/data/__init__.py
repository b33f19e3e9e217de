"""llmkit.data"""
