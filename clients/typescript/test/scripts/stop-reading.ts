// Watches the alerts of the information service at argv[2], replaying the
// stored ones, and breaks out of the loop at the first alert. Node exits
// only once nothing is left open: the stream's call must have ended.

import { createClient, createMeshTransport, untilEnd } from "@hivemesh/client";
import { InformationService } from "@hivemesh/client/information/v1";

const [address, how] = process.argv.slice(2);
const info = createClient(InformationService, createMeshTransport(address));
const stream = info.watchAlerts({ since: { seconds: 1n, nanos: 0 } });
for await (const message of how === "untilEnd" ? untilEnd(stream) : stream) {
  if (message.event.case === "alert") {
    console.log(`stopped reading at alert ${message.event.value.alertId}`);
    break;
  }
}
