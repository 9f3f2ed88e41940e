// Every writing function checks `secret` against the deployment's KLIPSTREAM_CONVEX_SECRET; a
// refused call writes nothing. The frontend's query needs no secret.
import { describe, expect, test } from "vitest";
import {
  CREATED,
  SECRET,
  TWITCH_ID,
  type T,
  allVideos,
  api,
  cancelledArgs,
  completedArgs,
  failedArgs,
  progressArgs,
  setup,
  videoRow,
} from "./harness.setup";

type Writer = {
  name: string;
  /** Call the function with `secret` (or without the argument when undefined). */
  call: (t: T, secret: string | undefined) => Promise<unknown>;
  /** What the row shows when the call went through. */
  written: Record<string, unknown>;
};

function withSecret<A extends { secret: string }>(args: A, secret: string | undefined) {
  const { secret: _ignored, ...rest } = args;
  return (secret === undefined ? rest : { ...rest, secret }) as A;
}

const writers: Writer[] = [
  {
    name: "upsertJobProgress",
    call: (t, s) =>
      t.mutation(
        api.video.upsertJobProgress,
        withSecret(progressArgs(CREATED + 1, "Downloading", 5), s),
      ),
    written: { status: "Downloading", progressPercentage: 5 },
  },
  {
    name: "markCompleted",
    call: (t, s) => t.mutation(api.video.markCompleted, withSecret(completedArgs(CREATED + 1), s)),
    written: { status: "Completed", progressPercentage: 100 },
  },
  {
    name: "markFailed",
    call: (t, s) => t.mutation(api.video.markFailed, withSecret(failedArgs(CREATED + 1, 3), s)),
    written: { status: "Failed", errorType: "download_failed" },
  },
  {
    name: "markCancelled",
    call: (t, s) =>
      t.mutation(api.video.markCancelled, withSecret(cancelledArgs(CREATED + 1, 4), s)),
    written: { status: "Cancelled", progressPercentage: 4 },
  },
  {
    name: "updateStatusByTwitchId",
    call: (t, s) =>
      t.mutation(
        api.video.updateStatusByTwitchId,
        withSecret({ secret: "", twitchId: TWITCH_ID, status: "Analyzing" }, s),
      ),
    written: { status: "Analyzing" },
  },
  {
    name: "updateUrls",
    call: (t, s) =>
      t.mutation(
        api.video.updateUrls,
        withSecret(
          { secret: "", twitchId: TWITCH_ID, urls: { chat_url: "https://storage.test/c.csv" } },
          s,
        ),
      ),
    written: { chat_url: "https://storage.test/c.csv" },
  },
];

/** updateStatus takes a row id, so it needs a row first; the row is what must stay unchanged. */
async function seedRow(t: T) {
  return await t.run(
    async (ctx) => await ctx.db.insert("videos", { twitchId: TWITCH_ID, status: "Queued" }),
  );
}

describe.each(writers)("$name", ({ call, written }) => {
  test("accepts the right secret", async () => {
    const t = setup();
    await call(t, SECRET);
    expect(await videoRow(t, TWITCH_ID)).toMatchObject(written);
  });

  test("refuses a wrong secret and writes nothing", async () => {
    const t = setup();
    await expect(call(t, "not-the-secret")).rejects.toThrow(
      "Unauthorized: wrong KLIPSTREAM_CONVEX_SECRET",
    );
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("refuses a secret that differs only in its last character, or is a prefix", async () => {
    const t = setup();
    await expect(call(t, SECRET.slice(0, -1) + "X")).rejects.toThrow("Unauthorized");
    await expect(call(t, SECRET.slice(0, -1))).rejects.toThrow("Unauthorized");
    await expect(call(t, SECRET + "0")).rejects.toThrow("Unauthorized");
    await expect(call(t, "")).rejects.toThrow("Unauthorized");
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("refuses a call without the secret argument", async () => {
    const t = setup();
    await expect(call(t, undefined)).rejects.toThrow(/secret/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("refuses every call while the deployment has no secret set", async () => {
    const t = setup(null);
    await expect(call(t, SECRET)).rejects.toThrow(
      "KLIPSTREAM_CONVEX_SECRET is not set on this Convex deployment",
    );
    await expect(call(t, "")).rejects.toThrow("KLIPSTREAM_CONVEX_SECRET is not set");
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("refuses every call while the deployment's secret is empty", async () => {
    const t = setup("");
    await expect(call(t, "")).rejects.toThrow("KLIPSTREAM_CONVEX_SECRET is not set");
    expect(await allVideos(t)).toHaveLength(0);
  });
});

describe("updateStatus", () => {
  const call = (t: T, id: Awaited<ReturnType<typeof seedRow>>, secret: string | undefined) =>
    t.mutation(api.video.updateStatus, withSecret({ secret: "", id, status: "Completed" }, secret));

  test("accepts the right secret", async () => {
    const t = setup();
    const id = await seedRow(t);
    await call(t, id, SECRET);
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({ _id: id, status: "Completed" });
  });

  test.each([
    ["a wrong secret", "not-the-secret", "Unauthorized"],
    ["an empty secret", "", "Unauthorized"],
    ["no secret argument", undefined, "secret"],
  ])("refuses %s and leaves the row unchanged", async (_label, secret, message) => {
    const t = setup();
    const id = await seedRow(t);
    const before = await videoRow(t, TWITCH_ID);
    await expect(call(t, id, secret)).rejects.toThrow(message);
    expect(await videoRow(t, TWITCH_ID)).toEqual(before);
  });

  test("refuses every call while the deployment has no secret set", async () => {
    const t = setup(null);
    const id = await seedRow(t);
    await expect(call(t, id, SECRET)).rejects.toThrow("KLIPSTREAM_CONVEX_SECRET is not set");
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({ status: "Queued" });
  });
});

test("getByTwitchIdPublic needs no secret", async () => {
  const t = setup(null);
  await seedRow(t);
  expect(await t.query(api.video.getByTwitchIdPublic, { twitchId: TWITCH_ID })).toMatchObject({
    twitchId: TWITCH_ID,
    status: "Queued",
  });
});
