// Parses an AsyncAPI document with the official parser and prints, as JSON, its diagnostics
// and each channel's messages (name and resolved payload): tests/test_asyncapi.py reads it.
import { Parser, fromFile } from "@asyncapi/parser";

const [path] = process.argv.slice(2);
const { document, diagnostics } = await fromFile(new Parser(), path).parse();
const summary = {
  diagnostics: diagnostics.map((d) => ({
    code: d.code,
    message: d.message,
    severity: d.severity, // 0 error, 1 warning, 2 information, 3 hint
    path: d.path.join("/"),
  })),
  version: document?.version() ?? null,
  channels: {},
  operations: {},
};
for (const channel of document?.channels() ?? []) {
  summary.channels[channel.id()] = {
    address: channel.address(),
    messages: channel.messages().all().map((message) => ({
      id: message.id(),
      name: message.name(),
      payload: message.payload()?.json() ?? null,
      headers: message.headers()?.json() ?? null,
      examples: message.examples().all().map((example) => example.payload() ?? null),
    })),
  };
}
for (const operation of document?.operations() ?? []) {
  summary.operations[operation.id()] = {
    action: operation.action(),
    channels: operation.channels().all().map((channel) => channel.id()),
    messages: operation.messages().all().map((message) => message.id()),
  };
}
console.log(JSON.stringify(summary));
