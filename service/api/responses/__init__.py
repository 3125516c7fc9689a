"""OpenAI's Responses API over the chat pipeline: request translation, response building, storage."""
